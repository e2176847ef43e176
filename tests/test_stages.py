"""Each stage function on tiny models, called directly (no Prefect, no MLflow), in order."""

import json
from collections import Counter

import pytest
from datasets import load_from_disk
from transformers import AutoModelForCausalLM

from distilflow.tasks import artifacts, journey
from distilflow.tasks.prototype import rejection_sample
from distilflow.tasks.stages import run_stage


def test_rejection_sampling_keeps_valid_correct_unique_answers(tiny_cfg):
    rows = [{"text": "a", "label": "bug"}, {"text": "b", "label": "payment"}, {"text": "c"}]
    answers = [["bug", "bug", "payment"], ["refund", "payment"], ["delivery"]]
    kept, rejected = rejection_sample(rows, answers, tiny_cfg.task)
    assert [(k["row"]["text"], k["answer"]) for k in kept] == [("a", "bug"), ("b", "payment"), ("c", "delivery")]
    assert rejected == Counter(duplicate=1, wrong_label=1, invalid=1)


@pytest.fixture(scope="module")
def stage_results(tiny_work, tiny_prototype, tiny_distill, tiny_compress):
    """The four stages run in order on the tiny config (the first three: the session's)."""
    deploy = run_stage("deploy", tiny_work, tiny_prototype, tiny_distill, tiny_compress)
    return tiny_work, {"prototype": tiny_prototype, "distill": tiny_distill, "compress": tiny_compress,
                       "deploy": deploy}


def test_prototype_writes_dataset_card_and_teacher_baseline(stage_results):
    cfg, results = stage_results
    result = results["prototype"]
    dataset = load_from_disk(result.dataset)
    assert len(dataset) == result.metrics["kept"] > 0
    assert result.metrics["kept"] + result.metrics["rejected"] == cfg.task.max_train * cfg.prototype.num_samples
    assert all(a in cfg.task.check.choices for a in dataset["answer"])
    assert set(dataset["label_source"]) == {"teacher"}  # tiny.yaml's training inputs are unlabelled
    assert "Data card" in result.data_card.read_text()
    assert result.teacher_row.state == "teacher"
    assert set(journey.FIELDS) <= result.teacher_row.as_json().keys()


def test_distill_trains_a_smaller_student(stage_results):
    cfg, results = stage_results
    student = AutoModelForCausalLM.from_pretrained(results["distill"].student)
    assert student.config.num_hidden_layers == cfg.distill.student.teacher_layers
    entry = results["distill"].last_phase
    assert entry.state == "student" and entry.params < results["prototype"].teacher_row.params


def test_compress_writes_a_smaller_quantized_checkpoint(stage_results):
    _, results = stage_results
    config = json.loads((results["compress"].model / "config.json").read_text())
    assert config["quantization_config"]["quant_method"] == "compressed-tensors"
    quantized, student = results["compress"].quantized, results["distill"].last_phase
    assert quantized.size_bytes < student.size_bytes
    assert quantized.bits_per_param < student.bits_per_param


def test_deploy_bundle_holds_model_card_journey_and_a_valid_manifest(stage_results):
    _, results = stage_results
    bundle = results["deploy"].bundle
    for name in ("config.json", "model.safetensors", "tokenizer.json", "generation_config.json",
                 "README.md", "journey.json", "eval_report.json", "manifest.json"):
        assert (bundle / name).is_file(), name
    assert artifacts.manifest_problems(bundle) == []
    written = json.loads((bundle / "journey.json").read_text())
    assert [e["state"] for e in written] == ["teacher", "baseline", "baseline", "student", "quantized", "deployed"]
    assert written == journey.to_json(results["deploy"].journey)
    assert "| deployed |" in (bundle / "README.md").read_text()
    deployed = results["deploy"].deployed
    assert 0 <= deployed.smoke_pass_rate <= 1 and deployed.smoke_latency_s > 0
