"""End to end: the real Prefect flow on the tiny config, tracked in a real MLflow store, re-run from cache."""

import json
from pathlib import Path

import pytest
from mlflow import MlflowClient

from distilflow.flows import cli
from distilflow.flows.cli import main
from tests.conftest import TINY_CONFIG


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Three pipeline runs on one workdir: first, unchanged re-run, and one with a changed distill section."""
    from prefect.testing.utilities import prefect_test_harness

    from distilflow.flows.pipeline import pipeline

    workdir = tmp_path_factory.mktemp("work")
    base = {"run.workdir": str(workdir)}
    with prefect_test_harness(server_startup_timeout=120):
        first = pipeline(str(TINY_CONFIG), base)
        again = pipeline(str(TINY_CONFIG), base)
        changed = pipeline(str(TINY_CONFIG), {**base, "distill.sft.max_steps": 2})
        artifacts = journey_artifacts()
    return {"first": first, "again": again, "changed": changed, "artifacts": artifacts}


def journey_artifacts() -> list[str]:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

    with get_client(sync_client=True) as client:
        found = client.read_artifacts(artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=["journey-tiny"])))
    return [artifact.data for artifact in found]


def stage_runs(record: dict) -> dict:
    client = MlflowClient(record["mlflow_tracking_uri"])
    parent = client.get_run(record["mlflow_run_id"])
    children = client.search_runs([parent.info.experiment_id],
                                  filter_string=f"tags.mlflow.parentRunId = '{parent.info.run_id}'")
    return {run.data.tags["distilflow.stage"]: run for run in children}


def test_journey_lists_every_model_state_with_its_numbers(runs):
    journey = runs["first"]["journey"]
    assert [e["state"] for e in journey] == ["teacher", "baseline", "baseline", "student", "quantized", "deployed"]
    assert [e["trained_on"] for e in journey if e["state"] == "baseline"] == ["labelled pool", "distillation labels"]
    for entry in journey:
        assert 0 <= entry["task_score"] <= 1 and entry["size_bytes"] > 0 and entry["params"] > 0
    models = {e["state"]: e for e in journey if e["state"] != "baseline"}
    for entry in models.values():
        assert entry["perplexity"] > 1 and entry["bits_per_param"] > 0 and entry["tokens_per_s"] > 0
    assert models["quantized"]["bits_per_param"] < models["student"]["bits_per_param"]


def test_bundle_is_written_with_the_journey(runs):
    bundle = Path(runs["first"]["bundle"])
    assert bundle.is_absolute()
    assert json.loads((bundle / "journey.json").read_text()) == runs["first"]["journey"]


def test_mlflow_parent_run_links_the_prefect_flow_run_and_holds_the_journey(runs):
    record = runs["first"]
    parent = MlflowClient(record["mlflow_tracking_uri"]).get_run(record["mlflow_run_id"])
    assert parent.info.status == "FINISHED"
    assert parent.data.tags["prefect.flow_run_id"] == record["run_id"]
    assert parent.data.params["distill.lora.r"] == "4"
    assert parent.data.metrics["journey.teacher.task_score"] == record["journey"][0]["task_score"]
    deployed = record["journey"][-1]
    assert parent.data.metrics["journey.deployed.size_bytes"] == deployed["size_bytes"]
    low, high = deployed["task_score_ci"]
    assert (parent.data.metrics["journey.deployed.task_score_ci_low"],
            parent.data.metrics["journey.deployed.task_score_ci_high"]) == (low, high)


def test_each_stage_is_a_finished_child_run(runs):
    children = stage_runs(runs["first"])
    assert set(children) == {"prototype", "distill", "compress", "deploy"}
    assert all(run.info.status == "FINISHED" for run in children.values())
    assert all(run.data.tags["distilflow.cached"] == "false" for run in children.values())


def test_what_the_loaded_models_may_run_is_recorded_in_mlflow(runs):
    record = runs["first"]
    params = MlflowClient(record["mlflow_tracking_uri"]).get_run(record["mlflow_run_id"]).data.params
    assert {params[f"{model}.{choice}"] for model in ("prototype.teacher", "distill.student")
            for choice in ("allow_pickle", "trust_remote_code")} == {"False"}
    prototype = stage_runs(record)["prototype"]
    assert (prototype.data.tags["distilflow.teacher.allow_pickle"],
            prototype.data.tags["distilflow.teacher.trust_remote_code"]) == ("false", "false")


def test_training_loss_is_logged_with_steps_in_the_phases_run(runs):
    client = MlflowClient(runs["first"]["mlflow_tracking_uri"])
    distill = stage_runs(runs["first"])["distill"]
    sft = client.search_runs([distill.info.experiment_id], filter_string=(
        f"tags.mlflow.parentRunId = '{distill.info.run_id}' and tags.`distilflow.phase` = 'sft'"))[0]
    history = client.get_metric_history(sft.info.run_id, "sft.loss")
    assert [m.step for m in history] == sorted(m.step for m in history) and history[-1].step > 0


def test_unchanged_rerun_reuses_every_stage(runs):
    children = stage_runs(runs["again"])
    assert all(run.data.tags["distilflow.cached"] == "true" for run in children.values())
    assert runs["again"]["bundle"] == runs["first"]["bundle"]
    assert runs["again"]["journey"] == runs["first"]["journey"]



def test_a_reused_stage_logs_what_it_logged_when_it_ran(runs):
    """Tracking at the edge: the runner logs each stage's recorded params, metrics, tags and artifacts once,
    so a reused stage's run is as complete as the fresh one's."""
    client = MlflowClient(runs["first"]["mlflow_tracking_uri"])
    fresh, reused = stage_runs(runs["first"]), stage_runs(runs["again"])
    for stage, run in fresh.items():
        again = reused[stage]
        assert again.data.metrics == run.data.metrics and again.data.params == run.data.params, stage
        assert {k: v for k, v in again.data.tags.items() if k.startswith("distilflow.") and k != "distilflow.cached"} \
            == {k: v for k, v in run.data.tags.items() if k.startswith("distilflow.") and k != "distilflow.cached"}
        assert artifact_paths(client, again.info.run_id) == artifact_paths(client, run.info.run_id), stage
    assert "bundle/README.md" in artifact_paths(client, reused["deploy"].info.run_id)
    assert "candidates.json" in artifact_paths(client, reused["compress"].info.run_id)


def artifact_paths(client, run_id: str, path: str | None = None) -> set[str]:
    found = set()
    for entry in client.list_artifacts(run_id, path):
        found |= artifact_paths(client, run_id, entry.path) if entry.is_dir else {entry.path}
    return found


def test_changing_distill_reruns_distill_and_everything_after_it(runs):
    cached = {name: run.data.tags["distilflow.cached"] for name, run in stage_runs(runs["changed"]).items()}
    assert cached == {"prototype": "true", "distill": "false", "compress": "false", "deploy": "false"}
    assert runs["changed"]["bundle"] != runs["first"]["bundle"]


def test_prefect_markdown_artifact_shows_the_journey_and_links_mlflow(runs):
    assert len(runs["artifacts"]) == 3  # one per run, under one key: the UI shows their history
    assert any("| deployed |" in markdown and runs["first"]["mlflow_run_id"] in markdown
               for markdown in runs["artifacts"])


def test_report_latest_json_describes_the_newest_run(runs, capsys):
    assert main(["report", "--latest", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert set(report) == {"run_id", "mlflow_run_id", "mlflow_tracking_uri", "bundle", "journey", "release"}
    assert report["release"]["passed"] and report["release"]["aliases"] == ["champion"]
    teacher = report["journey"][0]
    assert teacher["serving"]["engine"] == "llama.cpp" and set(teacher["cost_usd_per_mtok"]) == {"batch1", "throughput"}
    assert report["mlflow_tracking_uri"] == runs["changed"]["mlflow_tracking_uri"]
    assert report["run_id"] == runs["changed"]["run_id"]
    assert report["bundle"] == runs["changed"]["bundle"]
    for entry in report["journey"]:  # every state's task score with its 95% confidence interval
        low, high = entry["task_score_ci"]
        assert 0 <= low <= entry["task_score"] <= high <= 1


def test_report_latest_prints_the_journey_table(runs, capsys):
    assert main(["report", "--latest"]) == 0
    out = capsys.readouterr().out
    assert "| teacher |" in out and "MLflow run id" in out


def test_the_cli_lets_torchs_cpu_threads_sleep_unless_the_user_chose_otherwise(monkeypatch):
    monkeypatch.setattr(cli.os, "environ", {})
    cli._set_env_defaults()
    assert cli.os.environ["OMP_WAIT_POLICY"] == "PASSIVE"
    monkeypatch.setattr(cli.os, "environ", {"OMP_WAIT_POLICY": "ACTIVE"})
    cli._set_env_defaults()
    assert cli.os.environ["OMP_WAIT_POLICY"] == "ACTIVE"
