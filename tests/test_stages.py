"""Each stage function on tiny models, called directly (no Prefect, no MLflow), in order."""

import json
from collections import Counter

import pytest
from datasets import load_from_disk
from transformers import AutoModelForCausalLM

from distilflow.tasks import artifacts
from distilflow.tasks.evaluate import JOURNEY_FIELDS
from distilflow.tasks.prototype import rejection_sample
from distilflow.tasks.stages import run_stage


def test_rejection_sampling_keeps_valid_correct_unique_answers(tiny_cfg):
    rows = [{"text": "a", "label": "bug"}, {"text": "b", "label": "payment"}, {"text": "c"}]
    answers = [["bug", "bug", "payment"], ["refund", "payment"], ["delivery"]]
    kept, rejected = rejection_sample(rows, answers, tiny_cfg.task)
    assert [(k["row"]["text"], k["answer"]) for k in kept] == [("a", "bug"), ("b", "payment"), ("c", "delivery")]
    assert rejected == Counter(duplicate=1, wrong_label=1, invalid=1)


@pytest.fixture(scope="module")
def stage_results(tmp_path_factory):
    """The four stages run in order on the tiny config, once for this module."""
    from distilflow.configs.loader import load_config
    from tests.conftest import TINY_CONFIG

    cfg = load_config(TINY_CONFIG, {"run.workdir": str(tmp_path_factory.mktemp("work"))})
    results = {}
    for name in ("prototype", "distill", "compress", "deploy"):
        results[name] = run_stage(name, cfg, dict(results))
    return cfg, results


def test_prototype_writes_dataset_card_and_teacher_baseline(stage_results):
    cfg, results = stage_results
    result = results["prototype"]
    dataset = load_from_disk(result.path("dataset"))
    assert len(dataset) == result.metrics["kept"] > 0
    assert result.metrics["kept"] + result.metrics["rejected"] == cfg.task.max_train * cfg.prototype.num_samples
    assert all(a in cfg.task.check.choices for a in dataset["answer"])
    assert set(dataset["label_source"]) == {"teacher"}  # tiny.yaml's training inputs are unlabelled
    assert "Data card" in result.path("data_card").read_text()
    assert result.journey[0]["state"] == "teacher"
    assert set(JOURNEY_FIELDS) <= result.journey[0].keys()


def test_distill_trains_a_smaller_student(stage_results):
    cfg, results = stage_results
    student = AutoModelForCausalLM.from_pretrained(results["distill"].path("student"))
    assert student.config.num_hidden_layers == cfg.distill.student.teacher_layers
    entry = results["distill"].journey[0]
    assert entry["state"] == "student" and entry["params"] < results["prototype"].journey[0]["params"]


def test_compress_writes_a_smaller_quantized_checkpoint(stage_results):
    _, results = stage_results
    config = json.loads((results["compress"].path("model") / "config.json").read_text())
    assert config["quantization_config"]["quant_method"] == "compressed-tensors"
    quantized, student = results["compress"].journey[0], results["distill"].journey[0]
    assert quantized["size_bytes"] < student["size_bytes"]
    assert quantized["bits_per_param"] < student["bits_per_param"]


def test_deploy_bundle_holds_model_card_journey_and_a_valid_manifest(stage_results):
    _, results = stage_results
    bundle = results["deploy"].path("bundle")
    for name in ("config.json", "model.safetensors", "tokenizer.json", "generation_config.json",
                 "README.md", "journey.json", "eval_report.json", "manifest.json"):
        assert (bundle / name).is_file(), name
    assert artifacts.manifest_problems(bundle) == []
    journey = json.loads((bundle / "journey.json").read_text())
    assert [e["state"] for e in journey] == ["teacher", "student", "quantized", "deployed"]
    assert "| deployed |" in (bundle / "README.md").read_text()
    deployed = results["deploy"].journey[0]
    assert 0 <= deployed["smoke_pass_rate"] <= 1 and deployed["smoke_latency_s"] > 0


def test_stage_needs_its_upstream_results(tiny_cfg):
    with pytest.raises(ValueError, match="needs the results of"):
        run_stage("distill", tiny_cfg, {})
