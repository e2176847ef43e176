"""The deploy gate and the MLflow registry's aliases, on a real sqlite store (end to end: test_release.py)."""

import shutil
from dataclasses import replace

import pytest
from mlflow import MlflowClient

from distilflow.configs.schema import GateConfig
from distilflow.tasks import registry
from distilflow.tasks.artifacts import write_manifest
from distilflow.tasks.journey import JourneyEntry
from distilflow.tasks.journey import write as write_journey


def journey(score: float, teacher: float = 0.5, size_bytes: int = 2_000_000,
            latency: float = 0.1) -> list[JourneyEntry]:
    common = {"perplexity": 9.0, "params": 1000, "bits_per_param": 4.5, "tokens_per_s": 10.0}
    return [JourneyEntry("teacher", task_score=teacher, size_bytes=8_000_000, **common),
            JourneyEntry("deployed", task_score=score, size_bytes=size_bytes, smoke_latency_s=latency,
                         smoke_pass_rate=1.0, **common)]


def failed(checks) -> list[str]:
    return [c.key for c in checks if not c.passed]


def test_gate_with_no_limits_checks_nothing():
    assert registry.gate_checks(GateConfig(max_regression=None), journey(0.1), champion_score=0.9) == []


def test_gate_fails_a_task_score_below_the_minimum():
    checks = registry.gate_checks(GateConfig(min_task_score=0.6), journey(0.5), None)
    assert failed(checks) == ["deploy.gate.min_task_score"]
    assert checks[0].detail == "task score 0.500 < 0.600"


def test_gate_measures_retention_against_the_teacher():
    gate = GateConfig(min_retention=0.9)
    assert failed(registry.gate_checks(gate, journey(0.45, teacher=0.5), None)) == []
    assert failed(registry.gate_checks(gate, journey(0.44, teacher=0.5), None)) == ["deploy.gate.min_retention"]


def test_gate_fails_retention_when_the_teacher_scored_zero():
    assert failed(registry.gate_checks(GateConfig(min_retention=0.5), journey(0.4, teacher=0.0), None)) == \
        ["deploy.gate.min_retention"]


def test_gate_fails_a_model_too_large_or_too_slow():
    gate = GateConfig(max_size_mb=1.0, max_latency_s=0.05)
    assert failed(registry.gate_checks(gate, journey(0.5, size_bytes=2_000_000, latency=0.1), None)) == \
        ["deploy.gate.max_size_mb", "deploy.gate.max_latency_s"]


def test_gate_fails_a_score_below_the_champion_by_default():
    assert failed(registry.gate_checks(GateConfig(), journey(0.49), champion_score=0.5)) == \
        ["deploy.gate.max_regression"]
    assert failed(registry.gate_checks(GateConfig(), journey(0.5), champion_score=0.5)) == []


def test_gate_tolerates_the_configured_regression():
    assert failed(registry.gate_checks(GateConfig(max_regression=0.05), journey(0.46), champion_score=0.5)) == []


def with_interval(entries: list[JourneyEntry], low: float, high: float) -> list[JourneyEntry]:
    teacher, deployed = entries
    return [teacher, replace(deployed, task_score_ci=[low, high])]


def test_gate_lets_a_drop_inside_the_noise_band_through():
    # 0.74 on 400 items: Wilson 95% CI 0.695-0.781; the champion's 0.78 is inside it
    checks = registry.gate_checks(GateConfig(), with_interval(journey(0.74), 0.695, 0.781), champion_score=0.78)
    assert failed(checks) == []
    assert checks[0].detail.startswith("task score 0.740 (95% CI 0.695–0.781), top of its interval 0.781 >= 0.780")


def test_gate_blocks_a_drop_beyond_the_noise_band():
    checks = registry.gate_checks(GateConfig(), with_interval(journey(0.70), 0.653, 0.744), champion_score=0.78)
    assert failed(checks) == ["deploy.gate.max_regression"] and checks[0].detail.endswith("a drop beyond the noise")


def test_gate_adds_max_regression_to_the_noise_band():
    gate = GateConfig(max_regression=0.05)
    assert failed(registry.gate_checks(gate, with_interval(journey(0.70), 0.653, 0.744), champion_score=0.78)) == []


def with_baseline(states: list[JourneyEntry], score: float) -> list[JourneyEntry]:
    return [states[0], JourneyEntry("baseline", task_score=score, trained_on="labelled pool"), *states[1:]]


def test_gate_refuses_a_model_that_does_not_beat_the_baseline_by_the_margin():
    gate = GateConfig(min_margin_over_baseline=0.05)
    assert failed(registry.gate_checks(gate, with_baseline(journey(0.85), 0.80), None)) == []
    checks = registry.gate_checks(gate, with_baseline(journey(0.84), 0.80), None)
    assert failed(checks) == ["deploy.gate.min_margin_over_baseline"]
    assert "0.840 vs the baseline's 0.800 (baseline (labelled pool)): margin +0.040 < +0.050" in checks[0].detail


def test_gate_margin_without_a_baseline_in_the_journey_fails_and_says_so():
    checks = registry.gate_checks(GateConfig(min_margin_over_baseline=0.0), journey(0.9), None)
    assert failed(checks) == ["deploy.gate.min_margin_over_baseline"] and "no baseline" in checks[0].detail


def test_gate_does_not_compare_when_there_is_no_champion():
    assert registry.gate_checks(GateConfig(), journey(0.0), champion_score=None) == []


@pytest.fixture(scope="module")
def empty_store(tmp_path_factory):
    """An MLflow sqlite database with its tables made (that takes seconds), copied by each test."""
    path = tmp_path_factory.mktemp("store") / "mlflow.db"
    MlflowClient(f"sqlite:///{path}").search_experiments()
    return path


@pytest.fixture
def store(tmp_path, empty_store):
    """A real MLflow sqlite store with one (finished) pipeline run to register bundles from."""
    shutil.copy(empty_store, tmp_path / "mlflow.db")
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(uri)
    experiment = client.create_experiment("tiny", artifact_location=(tmp_path / "artifacts").as_uri())
    run = client.create_run(experiment)
    client.set_terminated(run.info.run_id)
    return uri, client, run.info.run_id


def bundle(tmp_path, name: str, score: float):
    """A bundle directory as the deploy stage leaves it: files, journey.json and manifest.json."""
    directory = tmp_path / name
    directory.mkdir()
    (directory / "model.safetensors").write_bytes(name.encode())
    write_journey(journey(score), directory)
    write_manifest(directory)
    return directory


def release(cfg, store, directory, flow_run="flow-run-1"):
    uri, _, run_id = store
    return registry.release(cfg, directory, uri, run_id, flow_run)


def test_first_version_that_passes_becomes_champion(tmp_path, tiny_cfg, store):
    outcome = release(tiny_cfg, store, bundle(tmp_path, "a", 0.5))
    assert outcome.passed and outcome.version == "1" and outcome.aliases == ["champion"]
    assert str(store[1].get_model_version_by_alias("tiny", "champion").version) == "1"


def test_version_is_tagged_with_journey_teacher_config_and_flow_run(tmp_path, tiny_cfg, store):
    release(tiny_cfg, store, bundle(tmp_path, "a", 0.5), flow_run="flow-run-7")
    tags = store[1].get_model_version("tiny", "1").tags
    assert tags["journey.deployed.task_score"] == "0.5" and tags["journey.teacher.task_score"] == "0.5"
    assert tags["journey.deployed.size_bytes"] == "2000000"
    assert tags["teacher"] == tiny_cfg.prototype.teacher.path
    assert tags["config_hash"] == registry.config_hash(tiny_cfg)
    assert tags["prefect.flow_run_id"] == "flow-run-7"
    assert tags["distilflow.gate"] == "passed"


def test_registered_version_holds_the_whole_bundle(tmp_path, tiny_cfg, store):
    import mlflow

    directory = bundle(tmp_path, "a", 0.5)
    release(tiny_cfg, store, directory)
    uri, client, _ = store
    mlflow.artifacts.download_artifacts(artifact_uri=client.get_model_version_download_uri("tiny", "1"),
                                        dst_path=str(tmp_path / "download"), tracking_uri=uri)
    assert sorted(p.name for p in (tmp_path / "download").rglob("*") if p.is_file()) == \
        ["journey.json", "manifest.json", "model.safetensors"]


def test_better_version_takes_champion_and_the_old_one_keeps_previous(tmp_path, tiny_cfg, store):
    release(tiny_cfg, store, bundle(tmp_path, "a", 0.5))
    outcome = release(tiny_cfg, store, bundle(tmp_path, "b", 0.6))
    client = store[1]
    assert outcome.passed and outcome.champion == "2"
    assert str(client.get_model_version_by_alias("tiny", "champion").version) == "2"
    assert str(client.get_model_version_by_alias("tiny", "previous").version) == "1"


def test_regressing_version_gets_candidate_and_champion_stays(tmp_path, tiny_cfg, store):
    cfg = tiny_cfg.model_copy(update={"deploy": tiny_cfg.deploy.model_copy(update={"gate": GateConfig()})})
    release(cfg, store, bundle(tmp_path, "a", 0.5))
    outcome = release(cfg, store, bundle(tmp_path, "b", 0.4))
    client = store[1]
    assert not outcome.passed and outcome.aliases == ["candidate"]
    assert str(client.get_model_version_by_alias("tiny", "champion").version) == "1"
    assert client.get_model_version("tiny", "2").tags["distilflow.gate"] == "failed"
    assert "deploy.gate.max_regression: task score 0.400 < 0.500 (champion's 0.500 - max_regression 0)" in \
        outcome.failure()
    assert "`champion` stays on version 1" in outcome.failure()


def test_releasing_the_same_bundle_again_reuses_its_version(tmp_path, tiny_cfg, store):
    directory = bundle(tmp_path, "a", 0.5)
    release(tiny_cfg, store, directory)
    outcome = release(tiny_cfg, store, directory)
    assert outcome.version == "1" and outcome.passed
    assert len(store[1].search_model_versions("name = 'tiny'")) == 1


def test_release_tags_the_mlflow_run_with_the_verdict_and_version(tmp_path, tiny_cfg, store):
    release(tiny_cfg, store, bundle(tmp_path, "a", 0.5))
    tags = store[1].get_run(store[2]).data.tags
    assert tags["distilflow.gate"] == "passed" and tags["distilflow.model_version"] == "tiny/1"


def test_gate_markdown_lists_each_check_and_the_champion():
    outcome = registry.Release("tiny", "2", registry.gate_checks(GateConfig(min_task_score=0.6), journey(0.5), None),
                               champion="1", aliases=["candidate"])
    markdown = outcome.markdown()
    assert "Deploy gate FAILED: tiny version 2" in markdown
    assert "| `deploy.gate.min_task_score` | FAIL | task score 0.500 < 0.600 |" in markdown
    assert "`champion` is version 1" in markdown
