"""A served teacher as first-class as a local one: from the same weights, the same choices (labels scored
from vLLM-style prompt log-probs, calibrated) and the same logit-KD cache; its endpoint checked before
the run; a stage retried through a server restart; the served model in the cache keys.

The servers are tests/openai_server.py on 127.0.0.1, answering with vLLM's shapes from the tiny model."""

import json
import re
import shutil
import threading
from collections import Counter
from contextlib import ExitStack, contextmanager
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from transformers import AutoTokenizer

from distilflow.configs.loader import load_config
from distilflow.configs.schema import HttpTeacherConfig
from distilflow.flows.cli import main
from distilflow.tasks import checks, data, decoding, teacher_logits
from distilflow.tasks.errors import DistilflowError
from distilflow.tasks.evaluate import Prompting
from distilflow.tasks.prototype import data_card
from distilflow.tasks.stages import cache_key, preflight, run_stage
from distilflow.tasks.teachers import GUIDED_CHOICE, LOG_LIKELIHOOD, LocalTeacher, open_teacher, served_model
from tests.conftest import TINY_CONFIG, TINY_TEACHER, free_port, serving

CPU = torch.device("cpu")
KEY_ENV = "DISTILFLOW_TEST_TEACHER_KEY"
# The tiny config, smaller still: these tests check what is produced, not how well.
SMALL = {"task.max_train": 12, "task.eval_size": 8, "eval.perplexity_examples": 4, "eval.speed_new_tokens": 2}


def served(server, **fields) -> HttpTeacherConfig:
    return HttpTeacherConfig(base_url=server.base_url, model=server.model, api_key_env=KEY_ENV, max_retries=1,
                             **fields)


def served_yaml(server, **fields) -> dict:
    return served(server, **fields).model_dump(mode="json", exclude_defaults=True)


@pytest.fixture
def key(openai_server, monkeypatch):
    monkeypatch.setenv(KEY_ENV, openai_server.api_key)


@pytest.fixture(scope="module")
def plain_server(tmp_path_factory):
    """A server without vLLM's prompt log-probs (as llama.cpp's or Ollama's), serving a copy of the tiny teacher."""
    copy = tmp_path_factory.mktemp("copy") / "tiny-teacher"
    shutil.copytree(TINY_TEACHER, copy)
    with serving(tmp_path_factory.mktemp("plain"), "--no-prompt-logprobs", model=copy) as (server, _):
        yield server


@pytest.fixture(scope="module")
def other_tokenizer(tmp_path_factory) -> Path:
    """The tiny teacher's tokenizer with one more token ("wörld"): text splits into other ids."""
    directory = tmp_path_factory.mktemp("other-tokenizer")
    tokenizer = AutoTokenizer.from_pretrained(TINY_TEACHER)
    assert tokenizer.add_tokens(["wörld"]) == 1
    tokenizer.save_pretrained(directory)
    return directory


@pytest.fixture
def held_out(tiny_cfg):
    split = data.load_task_data(tiny_cfg.task, tiny_cfg.run.seed)
    shots = data.few_shot_examples(split.train, tiny_cfg.task, tiny_cfg.prototype.few_shot, tiny_cfg.run.seed)
    return split.eval, Prompting(tuple(shots), calibrate=True)


# --- the same answers from the same weights -----------------------------------------------------------------

def test_served_label_scores_equal_local_ones_within_fp_noise(tiny_cfg, tiny_teacher, openai_server, key, held_out):
    model, tokenizer = tiny_teacher
    rows, prompting = held_out
    choices = tiny_cfg.task.check.choices
    teacher = open_teacher(served(openai_server, tokenizer=str(TINY_TEACHER)), CPU)
    remote = teacher.choice_logprobs(prompting.chats(rows, tiny_cfg.task), choices)
    local = decoding.choice_logprobs(model, tokenizer, prompting.prompts(tokenizer, rows, tiny_cfg.task), choices)
    torch.testing.assert_close(remote, local, atol=1e-4, rtol=0)


@pytest.mark.parametrize("sampling", [{}, {"temperature": 1.0, "num_samples": 3, "seed": 7}],
                         ids=["greedy", "sampled"])
def test_served_choices_equal_local_choices_on_the_held_out_split(tiny_cfg, tiny_teacher, openai_server, key,
                                                                  held_out, sampling):
    rows, prompting = held_out
    teacher = open_teacher(served(openai_server, tokenizer=str(TINY_TEACHER)), CPU)
    assert teacher.choice_method == LOG_LIKELIHOOD and prompting.calibration_chats(tiny_cfg.task)
    local = LocalTeacher(*tiny_teacher, name="tiny").answer(rows, tiny_cfg.task, prompting, **sampling)
    assert teacher.answer(rows, tiny_cfg.task, prompting, **sampling) == local


def test_the_data_card_says_labels_were_scored_from_the_servers_log_probs(tiny_cfg, openai_server, key):
    teacher = open_teacher(served(openai_server, tokenizer=str(TINY_TEACHER)), CPU)
    examples = data.load_task_data(tiny_cfg.task, 0)
    card = data_card([], Counter(), examples, examples.train, tiny_cfg.prototype, tiny_cfg.task, teacher)
    assert "Labels chosen by each label's full log-likelihood from the server's prompt log-probs, calibrated" in card


def test_a_server_without_prompt_logprobs_answers_by_guided_choice(tiny_cfg, plain_server, key, held_out):
    rows, prompting = held_out
    teacher = open_teacher(served(plain_server, tokenizer=str(TINY_TEACHER)), CPU)
    assert teacher.choice_method == GUIDED_CHOICE
    answers = teacher.answer(rows[:3], tiny_cfg.task, prompting)
    assert all(len(a) == 1 and a[0] in tiny_cfg.task.check.choices for a in answers)
    examples = data.load_task_data(tiny_cfg.task, 0)
    card = data_card([], Counter(), examples, examples.train, tiny_cfg.prototype, tiny_cfg.task, teacher)
    assert "Labels chosen by the server's guided choice" in card


def test_a_teacher_tokenizer_that_is_not_the_served_models_is_refused(openai_server, key, other_tokenizer):
    with pytest.raises(DistilflowError, match=r"prototype.teacher.tokenizer: .* is not the tokenizer of "
                                              r"tiny-teacher .* first differing at token \d+ \(\[[\d, ]*512"):
        open_teacher(served(openai_server, tokenizer=str(other_tokenizer)), CPU)


def test_served_label_probabilities_equal_local_ones_within_fp_noise(tiny_cfg, tiny_teacher, openai_server, key,
                                                                    held_out):
    rows, prompting = held_out
    teacher = open_teacher(served(openai_server, tokenizer=str(TINY_TEACHER)), CPU)
    local = LocalTeacher(*tiny_teacher, name="tiny").choice_scores(rows, tiny_cfg.task, prompting)
    torch.testing.assert_close(teacher.choice_scores(rows, tiny_cfg.task, prompting).softmax(1), local.softmax(1),
                               atol=1e-4, rtol=0)


# --- logit KD from the served teacher ------------------------------------------------------------------------

def test_the_logit_cache_built_through_the_server_equals_the_local_one(tiny_cfg, tiny_teacher, openai_server, key):
    model, tokenizer = tiny_teacher
    task = tiny_cfg.task
    rows = [{"prompt": data.messages(row, task), "completion": [{"role": "assistant", "content": checks.label(row, task)}]}
            for row in data.load_task_data(task, 0).eval[:16]]
    examples = teacher_logits.tokenize(tokenizer, rows, max_length=96)
    local = teacher_logits.compute(model, examples, top_k=16, temperature=1.0)
    remote = teacher_logits.compute_from_endpoint(open_teacher(served(openai_server), CPU), examples, top_k=16)
    assert remote.keys() == local.keys()
    for name in ("topk_ids", "input_ids", "completion_mask", "sequence_offsets"):
        assert torch.equal(remote[name], local[name]), name
    torch.testing.assert_close(remote["topk_logprobs"], local["topk_logprobs"], atol=1e-3, rtol=0)
    torch.testing.assert_close(remote["tail_logprob"], local["tail_logprob"], atol=1e-4, rtol=0)


def test_logit_kd_from_a_served_teacher_trains_on_its_cached_log_probs(openai_server, key, tmp_path):
    cfg = load_config(TINY_CONFIG, {"run.workdir": str(tmp_path), **SMALL,
                                    "prototype.teacher": served_yaml(openai_server, tokenizer=str(TINY_TEACHER)),
                                    "distill.student": {"path": str(TINY_TEACHER)}, "distill.phases": ["logit_kd"]})
    prototype = run_stage("prototype", cfg)
    distill = run_stage("distill", cfg, prototype)
    [cache] = (tmp_path / "artifacts" / "teacher_logits").glob("*/teacher_logits.safetensors")
    with safe_open(cache, "pt") as logits:
        assert logits.metadata()["teacher"] == f"tiny-teacher at {openai_server.base_url}"
        assert logits.get_tensor("topk_ids").shape[1] == cfg.distill.logit_kd.top_k
    assert 0 <= distill.metrics["logit_kd.task_score"] <= 1 and (distill.student / "config.json").is_file()


def test_a_served_teachers_label_probabilities_filter_its_answers_and_become_soft_labels(openai_server, key, tmp_path):
    """With its tokenizer and a server that returns prompt log-probs, a served teacher scores labels as a local one
    does: the confidence filters and soft-label KD work on it."""
    cfg = load_config(TINY_CONFIG, {"run.workdir": str(tmp_path), **SMALL,
                                    "prototype.teacher": served_yaml(openai_server, tokenizer=str(TINY_TEACHER)),
                                    "prototype.keep_most_confident": 0.5,
                                    "distill.student": {"path": str(TINY_TEACHER)}, "distill.phases": ["logit_kd"],
                                    "distill.logit_kd.teacher_logits": "choices"})
    preflight(cfg, f"sqlite:///{tmp_path / 'mlflow.db'}")
    prototype = run_stage("prototype", cfg)
    rows = [json.loads(line) for line in prototype.dataset_jsonl.read_text().splitlines()]
    assert rows and all(sum(row["choice_probs"].values()) == pytest.approx(1.0) for row in rows)
    assert all(row["confidence"] == row["choice_probs"][row["answer"]] for row in rows)
    assert prototype.metrics["rejected.less_confident"] > 0
    distill = run_stage("distill", cfg, prototype)
    assert 0 <= distill.metrics["logit_kd.task_score"] <= 1 and (distill.student / "config.json").is_file()


def test_a_student_whose_token_ids_differ_from_the_served_teachers_is_refused(openai_server, key, other_tokenizer):
    with pytest.raises(DistilflowError, match=r"logit_kd, but the student's tokenizer .* does not split text into "
                                              r"the token ids of the served teacher"):
        teacher_logits.require_served_vocabulary(open_teacher(served(openai_server), CPU), other_tokenizer)


# --- checked before the run -----------------------------------------------------------------------------------

@pytest.mark.parametrize("server, overrides, message", [
    ("openai_server", {"prototype.teacher.model": "gpt-9"}, r"prototype.teacher.model: .* does not serve 'gpt-9'"),
    ("openai_server", {"distill.phases": ["logit_kd"], "distill.logit_kd.top_k": 64},
     r"distill.logit_kd.top_k is 64, but .* refused 64 prompt log-probs .* --max-logprobs 64"),
    ("plain_server", {"distill.phases": ["logit_kd"]},
     r"distill.logit_kd.top_k is 16, but .* returns no prompt log-probs"),
    ("plain_server", {"prototype.teacher.tokenizer": str(TINY_TEACHER), "prototype.min_confidence": 0.5},
     r"prototype.min_confidence reads the teacher's probability of each label, but .* gives none \(the server's "
     r"guided choice"),
], ids=["unserved-model", "top-k-above-max-logprobs", "no-prompt-logprobs", "no-label-probabilities"])
def test_validate_checks_the_endpoint_before_any_stage(request, key, tmp_path, capsys, server, overrides, message):
    endpoint = request.getfixturevalue(server)
    settings = {"run.workdir": str(tmp_path), "prototype.teacher": served_yaml(endpoint),
                "distill.student": {"path": str(TINY_TEACHER)}, **overrides}
    assert main(["validate", str(TINY_CONFIG), *[f"--set={k}={v}" for k, v in settings.items()]]) == 2
    assert re.search(message, capsys.readouterr().err)


def test_validate_names_a_key_the_endpoint_rejects(openai_server, monkeypatch, tmp_path, capsys):
    monkeypatch.setenv(KEY_ENV, "not-the-key")
    settings = {"run.workdir": str(tmp_path), "prototype.teacher": served_yaml(openai_server),
                "distill.student": {"path": str(TINY_TEACHER)}}
    assert main(["validate", str(TINY_CONFIG), *[f"--set={k}={v}" for k, v in settings.items()]]) == 2
    error = capsys.readouterr().err
    assert "prototype.teacher.api_key_env: " in error and "rejected the API key" in error and "not-the-key" not in error


# --- what the key knows about the server -------------------------------------------------------------------------

@pytest.mark.slow  # two more server starts
def test_the_prototype_key_follows_the_model_the_server_reports(tmp_path, monkeypatch):
    """Two servers in turn on one port, one name: the tiny teacher, then a copy of it from another directory."""
    monkeypatch.setenv(KEY_ENV, "test-key-not-a-secret")
    port = free_port()
    copy = tmp_path / "copy"
    shutil.copytree(TINY_TEACHER, copy)
    endpoint = {"base_url": f"http://127.0.0.1:{port}/v1", "model": "tiny-teacher", "api_key_env": KEY_ENV}
    cfg = load_config(TINY_CONFIG, {"run.workdir": str(tmp_path / "work"), "prototype.teacher": endpoint,
                                    "distill.student": {"path": str(TINY_TEACHER)}})
    with serving(tmp_path, port=port):
        card = served_model(cfg.prototype.teacher, {KEY_ENV: "test-key-not-a-secret"})
        original = cache_key("prototype", cfg)
        assert cache_key("prototype", cfg) == original  # the server's per-call fields are left out
    with serving(tmp_path, model=copy, port=port):
        assert cache_key("prototype", cfg) != original
    assert card["root"] == str(TINY_TEACHER) and card["max_model_len"] == 512


# --- retried through a restart -------------------------------------------------------------------------------------

@contextmanager
def restarted_when_it_exits(process, log_dir: Path, port: int):
    """A new server on ``port`` as soon as ``process`` exits (a crash, then a restart); stopped after the block."""
    servers = ExitStack()

    def restart():
        process.wait()
        servers.enter_context(serving(log_dir, port=port, wait=False))

    thread = threading.Thread(target=restart, daemon=True)
    thread.start()
    try:
        yield
    finally:
        thread.join(timeout=60)
        servers.close()


def test_a_stage_is_retried_through_a_restart_of_its_teachers_server(tmp_path, monkeypatch):
    from prefect.client.orchestration import get_client
    from prefect.testing.utilities import prefect_test_harness

    from distilflow.flows.pipeline import stage_task, tracking_uri
    from distilflow.flows.retries import retried
    from distilflow.tasks.tracking import MlflowTracker

    monkeypatch.setenv(KEY_ENV, "test-key-not-a-secret")
    port = free_port()
    endpoint = {"base_url": f"http://127.0.0.1:{port}/v1", "model": "tiny-teacher", "api_key_env": KEY_ENV,
                "max_retries": 0}  # the client gives up at once: only the stage's retries can get through
    cfg = load_config(TINY_CONFIG, {"run.workdir": str(tmp_path / "work"), **SMALL, "prototype.teacher": endpoint,
                                    "distill.student": {"path": str(TINY_TEACHER)}, "run.retries": 4,
                                    "run.retry_delay_seconds": 8})
    tracker = MlflowTracker.start(tracking_uri(cfg), experiment="retries", artifact_root=tmp_path / "mlartifacts",
                                  run_name="retries", tags={})
    # The server dies when the stage sends its 6th answer request (of 24), and comes back on the same port.
    with serving(tmp_path, "--exit-at-request", "6", port=port) as (_, first), \
            restarted_when_it_exits(first, tmp_path, port), prefect_test_harness(server_startup_timeout=120):
        state = retried(stage_task, cfg)("prototype", cfg, (), tracker.run_id, return_state=True)
        with get_client(sync_client=True) as client:
            attempts = client.read_task_run(state.state_details.task_run_id).run_count
        assert first.returncode == 1  # it did die mid-stage
    assert state.is_completed() and attempts >= 2
    assert state.result().metrics["kept"] > 0
