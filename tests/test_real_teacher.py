"""The embedded teacher (SmolLM2-135M-Instruct, GGUF from PyPI): real behaviour, slow (make test-slow)."""

import pytest
import torch

from distilflow.configs.loader import load_config
from distilflow.tasks import data
from distilflow.tasks.evaluate import Prompting, evaluate
from distilflow.tasks.models import load_teacher
from tests.conftest import REPO

pytestmark = pytest.mark.slow

DEMO = REPO / "configs" / "demo.yaml"


@pytest.fixture(scope="module")
def demo_teacher():
    cfg = load_config(DEMO)
    model, tokenizer = load_teacher(cfg.prototype.teacher, torch.device("cpu"))
    return cfg, model, tokenizer


def test_gguf_teacher_loads_as_a_llama_with_its_chat_format(demo_teacher):
    _, model, tokenizer = demo_teacher
    assert model.config.num_hidden_layers == 30 and model.config.vocab_size == 49152
    assert tokenizer.eos_token == "<|im_end|>"
    assert tokenizer.chat_template


def test_teacher_few_shot_score_clears_the_bar(demo_teacher):
    cfg, model, tokenizer = demo_teacher
    split = data.load_task_data(cfg.task, cfg.run.seed)
    prompting = Prompting(tuple(data.few_shot_examples(split.pool, cfg.task, cfg.prototype.few_shot, 0)), True)
    result = evaluate(model, tokenizer, split.eval, cfg.task, cfg.eval, prompting=prompting)
    assert result.metrics["task_score"] >= 0.6


def test_pipeline_runs_on_the_real_teacher(tmp_path):
    from prefect.testing.utilities import prefect_test_harness

    from distilflow.flows.pipeline import pipeline

    overrides = {"run.workdir": str(tmp_path), "task.max_train": 48, "task.eval_size": 24,
                 "distill.sft.max_steps": 6, "compress.quantize.calibration_samples": 8,
                 "eval.perplexity_examples": 8, "eval.speed_new_tokens": 8, "deploy.smoke_prompts": 2,
                 "eval.serving": {"concurrency": 2, "decode_tokens": 16, "speed_repeats": 1, "latency_requests": 4},
                 # 6 SFT steps: a student this short-trained may neither retain nor agree across engines
                 "deploy.gate.min_retention": None, "deploy.gate.max_engine_gap": None}
    with prefect_test_harness(server_startup_timeout=120):
        record = pipeline(str(DEMO), overrides)
    journey = {e["state"]: e for e in record["journey"]}
    assert list(journey) == ["teacher", "teacher-gguf", "student", "quantized", "deployed"]
    assert journey["teacher-gguf"]["serving"]["artifact"] == "SmolLM2-135M-Instruct.Q4_1.gguf"
    assert journey["deployed"]["serving"]["artifact"] == "model-q4_0.gguf"
    assert journey["deployed"]["serving"]["artifact_bytes"] < journey["teacher"]["serving"]["artifact_bytes"] / 4
    assert journey["teacher"]["params"] > journey["student"]["params"]
    assert journey["deployed"]["size_bytes"] < journey["student"]["size_bytes"] < journey["teacher"]["size_bytes"]
    assert 0 <= journey["deployed"]["gguf_smoke_pass_rate"] <= 1  # demo.yaml exports GGUF; llama.cpp answered
