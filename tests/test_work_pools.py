"""Stages on their own Prefect work pools, against the real servers of a team's stack on 127.0.0.1: PostgreSQL, Prefect
on it, MLflow on it with its artifacts on an S3-compatible server, stage artifacts on that server, and two process
workers. The tiny pipeline runs with prototype and deploy on pool A and distill and compress on pool B, each pool with
its own workdir, so every artifact a stage reads travels through the store.

The stack and four pipeline runs took 26 minutes on a shared 2-core machine (2026-12-06; 11 of them starting the
stack and the two reference runs): `slow` (make test-slow). The config rules, the CLI's refusal without a server and
the compose file's checks are quick and in the default suite.
"""

import json
import os
import signal
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import pytest

from distilflow.configs.loader import load_config
from tests.conftest import REPO, TINY_CONFIG
from tests.team_stack import mlflow_server, postgres, prefect_server, process_worker, s3_server
from tests.test_chaos import journey

RUN_S = 900


def pooled_overrides(stack: dict, name: str) -> dict:
    """The tiny config with prototype and deploy on pool A, distill and compress on pool B, each pool's stages in
    that pool's own workdir."""
    placements = {"prototype": "a", "distill": "b", "compress": "b", "deploy": "a"}
    overrides = {"run.name": name, "run.workdir": str(stack["home"] / f"{name}-pipeline"),
                 "run.artifact_store": f"{stack['s3']['url']}/artifacts",
                 "run.mlflow_tracking_uri": stack["mlflow"]["uri"]}
    for stage, pool in placements.items():
        overrides[f"run.stages.{stage}.work_pool"] = f"pool-{pool}"
        overrides[f"run.stages.{stage}.workdir"] = str(stack["home"] / f"pool-{pool}")
    return overrides


def distilflow_run(stack: dict, overrides: dict, log: Path) -> subprocess.CompletedProcess:
    """`distilflow run configs/tiny.yaml --set ...` in its own process, against the stack's Prefect server."""
    sets = [arg for key, value in overrides.items() for arg in ("--set", f"{key}={value}")]
    env = {**os.environ, **stack["client_env"]}
    with open(log, "w") as out:
        return subprocess.run([sys.executable, "-m", "distilflow.flows.cli", "run", str(TINY_CONFIG), *sets],
                              env=env, cwd=REPO, stdout=out, stderr=subprocess.STDOUT, timeout=RUN_S)


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    """The team's stack, started once for the module and stopped by PID in reverse order."""
    home = tmp_path_factory.mktemp("stack")
    with postgres(home / "postgres") as database, s3_server(home) as s3, \
            prefect_server(home, database) as prefect, mlflow_server(home, database, s3) as mlflow:
        client_env = {**prefect["env"], **s3["env"], "MLFLOW_S3_ENDPOINT_URL": s3["env"]["AWS_ENDPOINT_URL"]}
        with process_worker(home, "pool-a", {**client_env, "PREFECT_HOME": str(home / "worker-a")}) as worker_a, \
                process_worker(home, "pool-b", {**client_env, "PREFECT_HOME": str(home / "worker-b")}) as worker_b:
            workers = {"pool-a": worker_a, "pool-b": worker_b}
            yield {"home": home, "s3": s3, "prefect": prefect, "mlflow": mlflow, "client_env": client_env,
                   "workers": workers, "database": database}


@pytest.fixture(scope="module")
def runs(stack):
    """The single-process run and the pooled run of the tiny pipeline on the same seed, each timed."""
    home = stack["home"]
    started = time.monotonic()
    single = distilflow_run(stack, {"run.workdir": str(home / "single")}, home / "single.log")
    single_s = time.monotonic() - started
    started = time.monotonic()
    pooled = distilflow_run(stack, pooled_overrides(stack, "pooled"), home / "pooled.log")
    pooled_s = time.monotonic() - started
    for name, run in (("single", single), ("pooled", pooled)):
        assert run.returncode == 0, (home / f"{name}.log").read_text()[-6000:]
    print(f"\nsingle process: {single_s:.1f} s; stages on two work pools: {pooled_s:.1f} s")
    return {"single": journey(home / "single"), "pooled": journey(home / "pooled-pipeline"),
            "pooled_record": newest_record(home / "pooled-pipeline"), "single_s": single_s, "pooled_s": pooled_s}


def newest_record(workdir: Path) -> dict:
    return json.loads(max((workdir / "runs").glob("*.json"), key=lambda p: p.stat().st_mtime).read_text())


@contextmanager
def prefect_client(stack):
    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with temporary_settings({PREFECT_API_URL: stack["prefect"]["url"]}), get_client(sync_client=True) as client:
        yield client


@pytest.mark.slow
def test_stages_on_two_pools_give_the_single_process_journey(runs):
    assert runs["pooled"] == runs["single"]


@pytest.mark.slow
def test_each_stage_ran_as_a_flow_run_of_its_deployment_on_its_pool(runs, stack):
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterParentFlowRunId

    with prefect_client(stack) as client:
        parent = client.read_flow_run(runs["pooled_record"]["run_id"])
        children = client.read_flow_runs(
            flow_run_filter=FlowRunFilter(parent_flow_run_id=FlowRunFilterParentFlowRunId(any_=[parent.id])))
        pools = {run.name: (run.work_pool_name, run.state.name) for run in children}
    assert parent.state.name == "Completed"
    assert pools == {"prototype": ("pool-a", "Completed"), "distill": ("pool-b", "Completed"),
                     "compress": ("pool-b", "Completed"), "deploy": ("pool-a", "Completed")}


@pytest.mark.slow
def test_mlflow_on_postgres_holds_the_run_its_four_stage_runs_and_the_registry_entry(runs, stack):
    from mlflow import MlflowClient

    client = MlflowClient(stack["mlflow"]["uri"])
    record = runs["pooled_record"]
    parent = client.get_run(record["mlflow_run_id"])
    children = client.search_runs([parent.info.experiment_id],
                                  filter_string=f"tags.mlflow.parentRunId = '{parent.info.run_id}'")
    assert sorted(run.data.tags["distilflow.stage"] for run in children) == ["compress", "deploy", "distill",
                                                                              "prototype"]
    assert all(run.info.status == "FINISHED" for run in [parent, *children])
    assert client.search_model_versions("name = 'pooled'")
    assert stack["mlflow"]["backend"].startswith("postgresql://")


@pytest.mark.slow
def test_mlflow_artifacts_and_stage_artifacts_are_in_the_object_store(runs, stack):
    import fsspec

    fs = fsspec.filesystem("s3", skip_instance_cache=True, endpoint_url=stack["s3"]["env"]["AWS_ENDPOINT_URL"],
                           key=stack["s3"]["env"]["AWS_ACCESS_KEY_ID"],
                           secret=stack["s3"]["env"]["AWS_SECRET_ACCESS_KEY"])
    bucket = stack["s3"]["url"].removeprefix("s3://")
    assert {path.rsplit("/", 1)[1] for path in fs.ls(f"{bucket}/artifacts")} >= {"prototype", "distill", "compress",
                                                                                 "deploy"}
    assert fs.find(f"{bucket}/mlflow")  # the MLflow server's --artifacts-destination


@pytest.mark.slow
def test_a_killed_stage_process_crashes_its_flow_run_fails_the_pipeline_and_a_rerun_resumes(runs, stack):
    """The flow-run process of distill on pool B is killed (SIGKILL, as the OOM killer does) once distill has
    written a checkpoint; a re-run of the same command resumes from it."""
    home = stack["home"]
    overrides = {**pooled_overrides(stack, "crash"), "distill.sft.max_steps": 8}
    log = home / "crash.log"
    sets = [arg for key, value in overrides.items() for arg in ("--set", f"{key}={value}")]
    with open(log, "w") as out:
        parent = subprocess.Popen([sys.executable, "-m", "distilflow.flows.cli", "run", str(TINY_CONFIG), *sets],
                                  env={**os.environ, **stack["client_env"]}, cwd=REPO, stdout=out,
                                  stderr=subprocess.STDOUT)
    checkpoints = home / "pool-b" / "checkpoints" / "distill"
    deadline = time.monotonic() + RUN_S
    while not list(checkpoints.glob("*/**/checkpoint-*/trainer_state.json")):
        assert parent.poll() is None and time.monotonic() < deadline, log.read_text()[-4000:]
        time.sleep(0.5)
    os.kill(flow_run_process(stack["workers"]["pool-b"]), signal.SIGKILL)
    assert parent.wait(timeout=RUN_S) == 2
    output = log.read_text()
    assert "error: stage distill on work pool pool-b ended Crashed" in output
    assert "run the pipeline again to resume" in output

    rerun = distilflow_run(stack, overrides, home / "crash-rerun.log")
    assert rerun.returncode == 0, (home / "crash-rerun.log").read_text()[-6000:]
    assert "resuming from" in (home / "worker-pool-b.log").read_text()


def flow_run_process(worker: subprocess.Popen) -> int:
    """The pid of the flow-run process ``worker`` started (its child running Prefect's engine)."""
    for proc in Path("/proc").glob("[0-9]*"):
        try:
            parent = int((proc / "stat").read_text().rsplit(")", 1)[1].split()[1])
            cmdline = (proc / "cmdline").read_bytes()
        except OSError:
            continue
        if parent == worker.pid and b"prefect.engine" in cmdline:
            return int(proc.name)
    raise AssertionError(f"worker {worker.pid} runs no flow-run process")


def test_stages_on_pools_need_an_artifact_store(tmp_path):
    from distilflow.tasks.errors import DistilflowError

    with pytest.raises(DistilflowError, match="run.stages puts distill on their own work pools.*set run.artifact_store"):
        load_config(TINY_CONFIG, {"run.workdir": str(tmp_path), "run.stages.distill.work_pool": "gpu"})


def test_distilflow_run_with_stages_on_pools_and_no_prefect_server_says_to_set_one(tmp_path, capsys, monkeypatch):
    from distilflow.flows.cli import main

    monkeypatch.delenv("PREFECT_API_URL", raising=False)
    code = main(["run", str(TINY_CONFIG), "--set", f"run.workdir={tmp_path}", "--set",
                 "run.stages.distill.work_pool=gpu", "--set", f"run.artifact_store=file://{tmp_path}/store"])
    assert code == 2
    assert "run.stages puts distill on gpu: the pools' workers take their runs from a Prefect server; set " \
           "PREFECT_API_URL" in capsys.readouterr().err


def test_the_team_stack_compose_file_runs_the_pinned_prefect_on_postgres_and_a_worker_per_pool():
    """docker/team-stack.compose.yaml (no Docker engine here: its structure, and its pins against ours)."""
    import yaml
    from importlib.metadata import version

    services = yaml.safe_load((REPO / "docker" / "team-stack.compose.yaml").read_text())["services"]
    assert services["prefect"]["image"].startswith(f"prefecthq/prefect:{version('prefect')}-")
    assert services["prefect"]["environment"]["PREFECT_API_DATABASE_CONNECTION_URL"].startswith("postgresql+asyncpg://")
    mlflow = " ".join(services["mlflow"]["command"])
    assert "--backend-store-uri postgresql://" in mlflow and "--artifacts-destination s3://distilflow/mlflow" in mlflow
    assert {name: service["command"] for name, service in services.items() if name.startswith("worker-")} == {
        "worker-cpu": "prefect worker start --pool cpu --type process",
        "worker-gpu": "prefect worker start --pool gpu --type process"}
