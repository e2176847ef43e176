"""The embedded teacher (SmolLM2-135M-Instruct) served by tests/openai_server.py from its own weights: the
same choices over HTTP as in memory on the demo's held-out split, the same logit-KD cache, and logit KD
end to end from its prompt log-probs. Slow (make test-slow)."""

import pytest
import torch
from safetensors import safe_open

from distilflow.configs.loader import load_config
from distilflow.configs.schema import HttpTeacherConfig
from distilflow.tasks import checks, data, prune, teacher_logits
from distilflow.tasks.evaluate import Prompting
from distilflow.tasks.models import load_teacher, save_model
from distilflow.tasks.stages import run_stage
from distilflow.tasks.teachers import LOG_LIKELIHOOD, HttpTeacher, LocalTeacher
from tests.conftest import REPO, SERVER_API_KEY, serving

pytestmark = pytest.mark.slow

DEMO = REPO / "configs" / "demo.yaml"
CPU = torch.device("cpu")
KEY_ENV = "DISTILFLOW_TEST_TEACHER_KEY"
TOP_K = 64


@pytest.fixture(scope="module")
def demo_teacher(tmp_path_factory):
    """The demo's teacher in memory, and the same weights saved (fp32) for the server."""
    cfg = load_config(DEMO)
    model, tokenizer = load_teacher(cfg.prototype.teacher, CPU)
    directory = tmp_path_factory.mktemp("teacher") / "SmolLM2-135M-Instruct"
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return cfg, model, tokenizer, directory


@pytest.fixture(scope="module")
def served_teacher(demo_teacher, tmp_path_factory):
    *_, directory = demo_teacher
    with serving(tmp_path_factory.mktemp("server"), "--max-logprobs", str(TOP_K), model=directory,
                 name="smollm2-135m-instruct") as (server, _):
        yield HttpTeacherConfig(base_url=server.base_url, model=server.model, api_key_env=KEY_ENV,
                                tokenizer=str(directory), max_concurrency=2, timeout_s=300)


@pytest.fixture(autouse=True)
def key(monkeypatch):
    monkeypatch.setenv(KEY_ENV, SERVER_API_KEY)


def test_served_choices_equal_local_choices_on_the_demos_held_out_split(demo_teacher, served_teacher):
    cfg, model, tokenizer, _ = demo_teacher
    split = data.load_task_data(cfg.task, cfg.run.seed)
    shots = data.few_shot_examples(split.train, cfg.task, cfg.prototype.few_shot, cfg.run.seed)
    prompting = Prompting(tuple(shots), calibrate=True)
    teacher = HttpTeacher.connect(served_teacher, SERVER_API_KEY)
    assert teacher.choice_method == LOG_LIKELIHOOD
    remote = teacher.answer(split.eval, cfg.task, prompting)
    local = LocalTeacher(model, tokenizer, name="local").answer(split.eval, cfg.task, prompting)
    agree = sum(r == l for r, l in zip(remote, local))
    assert remote == local, f"{agree} of {len(local)} held-out answers agree"


def test_the_logit_cache_built_through_the_server_equals_the_local_one(demo_teacher, served_teacher):
    cfg, model, tokenizer, _ = demo_teacher
    rows = [{"prompt": data.messages(row, cfg.task), "completion": [{"role": "assistant",
                                                                     "content": checks.label(row, cfg.task)}]}
            for row in data.load_task_data(cfg.task, cfg.run.seed).train[:16]]
    examples = teacher_logits.tokenize(tokenizer, rows, max_length=128)
    local = teacher_logits.compute(model, examples, TOP_K, temperature=1.0)
    remote = teacher_logits.compute_from_endpoint(HttpTeacher.connect(served_teacher, SERVER_API_KEY), examples,
                                                  TOP_K)
    assert torch.equal(remote["topk_ids"], local["topk_ids"])
    torch.testing.assert_close(remote["topk_logprobs"], local["topk_logprobs"], atol=2e-3, rtol=0)
    torch.testing.assert_close(remote["tail_logprob"], local["tail_logprob"], atol=1e-3, rtol=0)


def test_logit_kd_runs_end_to_end_from_the_served_teacher(demo_teacher, served_teacher, tmp_path):
    """The demo, its teacher served: prototype over HTTP, then logit KD into a 6-layer cut of the teacher
    (a student with the teacher's tokenizer) from the served teacher's top-64 prompt log-probs."""
    _, model, tokenizer, _ = demo_teacher
    student = save_model(prune.keep_layers(model, [0, 1, 24, 27, 28, 29]), tokenizer, tmp_path / "student")
    cfg = load_config(DEMO, {"run.workdir": str(tmp_path / "work"), "task.max_train": 24, "task.eval_size": 16,
                             "prototype.teacher": served_teacher.model_dump(mode="json", exclude_defaults=True),
                             "prototype.shot_candidates": 1, "distill.student": {"path": str(student)},
                             "distill.phases": ["logit_kd"], "distill.logit_kd.top_k": TOP_K,
                             "distill.logit_kd.max_steps": 4, "distill.logit_kd.per_device_train_batch_size": 4,
                             "distill.logit_kd.max_length": 128, "eval.perplexity_examples": 4,
                             "eval.speed_new_tokens": 4})
    prototype = run_stage("prototype", cfg)
    assert "from the server's prompt log-probs, calibrated" in prototype.summary
    distill = run_stage("distill", cfg, prototype)
    [cache] = (tmp_path / "work" / "artifacts" / "teacher_logits").glob("*/teacher_logits.safetensors")
    with safe_open(cache, "pt") as logits:
        assert logits.get_tensor("topk_ids").shape[1] == TOP_K
    assert distill.metrics["logit_kd.task_score"] >= 0 and (distill.student / "config.json").is_file()
