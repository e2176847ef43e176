"""Each teacher kind answers the task: a local model dir, bitsandbytes loading (GPU only), and an
OpenAI-compatible HTTP endpoint (a real local server generating with the tiny model)."""

import json
import urllib.request

import pytest
import torch

from distilflow.configs.schema import HttpTeacherConfig, JsonSchemaCheck, LocalTeacherConfig, RegexCheck
from distilflow.tasks import data
from distilflow.tasks.errors import DistilflowError
from distilflow.tasks import journey
from distilflow.tasks.evaluate import Evaluator, Prompting
from distilflow.tasks.teachers import HttpTeacher, LocalTeacher, open_teacher
from tests.conftest import TINY_TEACHER, free_port

CPU = torch.device("cpu")
KEY_ENV = "DISTILFLOW_TEST_TEACHER_KEY"


@pytest.fixture
def http_cfg(openai_server, monkeypatch):
    monkeypatch.setenv(KEY_ENV, openai_server.api_key)
    return HttpTeacherConfig(base_url=openai_server.base_url, model=openai_server.model, api_key_env=KEY_ENV,
                             max_retries=2, timeout_s=60)


@pytest.fixture
def split(tiny_cfg):
    return data.load_task_data(tiny_cfg.task, 0)


def test_local_teacher_answers_with_the_tasks_labels(tiny_cfg, split):
    teacher = open_teacher(LocalTeacherConfig(path=str(TINY_TEACHER)), CPU)
    assert isinstance(teacher, LocalTeacher) and not teacher.black_box
    answers = teacher.answer(split.train[:4], tiny_cfg.task, Prompting(), temperature=1.0, num_samples=3)
    assert len(answers) == 4 and all(len(a) == 3 and set(a) <= set(tiny_cfg.task.check.choices) for a in answers)


def test_http_teacher_answers_among_the_choices_by_guided_decoding(http_cfg, tiny_cfg, split):
    teacher = open_teacher(http_cfg, CPU)
    assert isinstance(teacher, HttpTeacher) and teacher.black_box
    answers = teacher.answer(split.train[:6], tiny_cfg.task, Prompting())
    assert all(len(a) == 1 and a[0] in tiny_cfg.task.check.choices for a in answers)


def test_http_teacher_samples_num_samples_answers_per_input(http_cfg, tiny_cfg, split):
    answers = open_teacher(http_cfg, CPU).answer(split.train[:3], tiny_cfg.task, Prompting(), temperature=1.0,
                                                 num_samples=4, seed=1)
    assert [len(a) for a in answers] == [4, 4, 4]


def test_http_teacher_without_structured_outputs_answers_free_text(http_cfg, tiny_cfg, split):
    teacher = open_teacher(http_cfg.model_copy(update={"structured_outputs": False}), CPU)
    task = tiny_cfg.task.model_copy(update={"check": RegexCheck(type="regex", pattern=".*"), "max_answer_tokens": 5})
    answers = teacher.answer(split.train[:2], task, Prompting())
    assert all(isinstance(a[0], str) for a in answers)


def inject(openai_server, fault: str, **request) -> None:
    """Ask the test server to fail (fail-next) or delay (slow-next) its next requests."""
    urllib.request.urlopen(urllib.request.Request(
        f"{openai_server.base_url.removesuffix('/v1')}/test/{fault}", data=json.dumps(request).encode(),
        headers={"Content-Type": "application/json"}), timeout=10)


def test_http_teacher_retries_an_overloaded_server(http_cfg, tiny_cfg, split, openai_server):
    teacher = open_teacher(http_cfg.model_copy(update={"max_concurrency": 1}), CPU)
    inject(openai_server, "fail-next", count=2)  # two 503s, then answers: within max_retries=2
    assert len(teacher.answer(split.train[:1], tiny_cfg.task, Prompting())) == 1


def test_http_teacher_gives_up_after_max_retries_with_the_status(http_cfg, tiny_cfg, split, openai_server):
    teacher = open_teacher(http_cfg.model_copy(update={"max_retries": 0}), CPU)
    inject(openai_server, "fail-next", count=1)
    with pytest.raises(DistilflowError, match="answered 503"):
        teacher.answer(split.train[:1], tiny_cfg.task, Prompting())


def test_http_teacher_times_out_a_request_that_takes_too_long(http_cfg, tiny_cfg, split, openai_server):
    teacher = open_teacher(http_cfg.model_copy(update={"max_retries": 0, "timeout_s": 1.0}), CPU)
    inject(openai_server, "slow-next", count=1, seconds=3)
    with pytest.raises(DistilflowError, match="prototype.teacher.timeout_s: .* did not answer within 1 s"):
        teacher.answer(split.train[:1], tiny_cfg.task, Prompting())


def test_unreachable_endpoint_is_a_clear_error():
    cfg = HttpTeacherConfig(base_url=f"http://127.0.0.1:{free_port()}/v1", model="m", max_retries=0)
    with pytest.raises(DistilflowError, match=r"prototype.teacher.base_url: cannot reach .* is the server running"):
        open_teacher(cfg, CPU)


def test_missing_api_key_env_var_is_named(http_cfg, monkeypatch):
    monkeypatch.delenv(KEY_ENV)
    with pytest.raises(DistilflowError, match=f"environment variable {KEY_ENV} is not set"):
        open_teacher(http_cfg, CPU)


def test_wrong_api_key_is_reported_without_the_key(http_cfg, monkeypatch):
    monkeypatch.setenv(KEY_ENV, "wrong-key-123")
    with pytest.raises(DistilflowError, match="rejected the API key") as caught:
        open_teacher(http_cfg, CPU)
    assert "wrong-key-123" not in str(caught.value)


def test_model_the_endpoint_does_not_serve_is_named(http_cfg):
    with pytest.raises(DistilflowError, match=r"does not serve 'gpt-9'; it serves \['tiny-teacher'\]"):
        open_teacher(http_cfg.model_copy(update={"model": "gpt-9"}), CPU)


def test_black_box_baseline_has_a_score_and_speed_but_no_weights(http_cfg, tiny_cfg, split):
    evaluator = Evaluator(tiny_cfg.task, split.eval[:4], tiny_cfg.eval, CPU)
    entry = open_teacher(http_cfg, CPU).evaluate(evaluator, Prompting()).journey_entry("teacher").as_json()
    assert set(journey.FIELDS) <= entry.keys()
    assert 0 <= entry["task_score"] <= 1 and entry["tokens_per_s"] > 0
    assert entry["size_bytes"] is None and entry["params"] is None and entry["perplexity"] is None


def test_json_schema_check_asks_the_server_for_that_schema():
    teacher = HttpTeacher(HttpTeacherConfig(base_url="http://unused/v1", model="m"), client=None, key="t")
    schema = {"type": "object", "required": ["name"]}
    request = teacher._constraint(JsonSchemaCheck(type="json_schema", json_schema=schema))
    assert request == {"response_format": {"type": "json_schema", "json_schema": {"name": "answer", "schema": schema}}}
