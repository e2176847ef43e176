"""A pipeline killed with SIGKILL mid-stage leaves no artifact that looks finished; the re-run redoes
only that stage. Real subprocesses, real kill -9."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import TINY_CONFIG

DISTILFLOW = str(Path(sys.executable).with_name("distilflow"))


def start_run(workdir: Path) -> subprocess.Popen:
    return subprocess.Popen([DISTILFLOW, "run", str(TINY_CONFIG), "--set", f"run.workdir={workdir}"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=os.environ.copy(),
                            start_new_session=True)


def kill_when_partial(process: subprocess.Popen, stage_dir: Path, timeout_s: float = 300) -> None:
    """SIGKILL the run as soon as the stage has started writing its (partial) output: the whole process
    group, as a lost machine would, so its temporary Prefect server does not outlive it."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if stage_dir.is_dir() and any(p.name.startswith(".") and ".partial-" in p.name for p in stage_dir.iterdir()):
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
            return
        if process.poll() is not None:
            pytest.fail(f"the run ended before {stage_dir.name} started writing:\n{process.stdout.read().decode()}")
        time.sleep(0.02)
    process.kill()
    pytest.fail(f"{stage_dir.name} never started")


def finished(stage_dir: Path) -> list[Path]:
    return [p for p in stage_dir.iterdir() if p.is_dir() and not p.name.startswith(".")] if stage_dir.is_dir() else []


def stages_cached_in_newest_run(workdir: Path) -> dict:
    """stage -> "true"/"false": whether the newest pipeline run reused that stage's artifact."""
    from mlflow import MlflowClient

    client = MlflowClient(f"sqlite:///{workdir / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("tiny").experiment_id
    newest = client.search_runs([experiment], filter_string="tags.`prefect.flow_run_id` != ''",
                                order_by=["attributes.start_time DESC"], max_results=1)[0]
    children = client.search_runs([experiment], filter_string=f"tags.mlflow.parentRunId = '{newest.info.run_id}'")
    return {run.data.tags["distilflow.stage"]: run.data.tags["distilflow.cached"] for run in children}


@pytest.mark.parametrize("stage", ["compress", "deploy"])
def test_killed_stage_leaves_nothing_finished_and_the_rerun_redoes_only_it(tmp_path, stage):
    workdir = tmp_path / "work"
    kill_when_partial(start_run(workdir), workdir / "artifacts" / stage)
    assert finished(workdir / "artifacts" / stage) == []

    rerun = subprocess.run([DISTILFLOW, "run", str(TINY_CONFIG), "--set", f"run.workdir={workdir}"],
                           capture_output=True, text=True, env=os.environ.copy())
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    cached = stages_cached_in_newest_run(workdir)
    before = {"compress": ["prototype", "distill"], "deploy": ["prototype", "distill", "compress"]}[stage]
    assert all(cached[name] == "true" for name in before)
    assert cached[stage] == "false"
    assert len(finished(workdir / "artifacts" / stage)) == 1
    assert not any(".partial-" in p.name for p in (workdir / "artifacts" / stage).iterdir())
