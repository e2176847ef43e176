"""A pipeline killed with SIGKILL mid-stage leaves no artifact that looks finished; the re-run redoes
only that stage. Real subprocesses, real kill -9."""

import os
import signal
import subprocess
import sys
import time
import urllib.request
from contextlib import nullcontext
from pathlib import Path

import pytest

from tests.conftest import TINY_CONFIG, with_stages

DISTILFLOW = str(Path(sys.executable).with_name("distilflow"))


def start_run(workdir: Path, *overrides: str, output: Path | None = None, env: dict | None = None) -> subprocess.Popen:
    """`distilflow run` of the tiny config in a process group of its own; its output piped, or written to ``output``
    (a run that goes to the end writes more than a pipe holds)."""
    settings = [arg for override in (f"run.workdir={workdir}", *overrides) for arg in ("--set", override)]
    with open(output, "w") if output else nullcontext(subprocess.PIPE) as stdout:
        return subprocess.Popen([DISTILFLOW, "run", str(TINY_CONFIG), *settings],
                                stdout=stdout, stderr=subprocess.STDOUT, env=env or os.environ.copy(),
                                start_new_session=True, preexec_fn=as_from_a_terminal)


def as_from_a_terminal() -> None:
    """SIGINT as a terminal leaves it: a test suite started in the background (`make test &`) inherits it
    ignored, and so would the run, which would then rightly never see the Ctrl-C the test sends."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


# tiny.yaml's 4 SFT steps can end before a signal sent as distill starts lands: train long enough to be stopped.
LONG_DISTILL = ("distill.sft.max_steps=40",)


def kill_when_partial(process: subprocess.Popen, stage_dir: Path, timeout_s: float = 300,
                      sig: int = signal.SIGKILL, group: bool = True) -> None:
    """Send ``sig`` (SIGKILL: as a lost machine would) as soon as the stage has started writing its (partial)
    output: to the whole process group by default, so its temporary Prefect server does not outlive a SIGKILL."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if stage_dir.is_dir() and any(p.name.startswith(".") and ".partial-" in p.name for p in stage_dir.iterdir()):
            (os.killpg if group else os.kill)(process.pid, sig)
            process.wait(timeout=120)
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


# In `make test-slow`: every stage publishes the same way, and the kill -9 mid-distill below checks it too.
@pytest.mark.slow
@pytest.mark.parametrize("stage", ["compress", "deploy"])
def test_killed_stage_leaves_nothing_finished_and_the_rerun_redoes_only_it(tmp_path, stage):
    workdir = tmp_path / "work"
    kill_when_partial(start_run(workdir), workdir / "artifacts" / stage)
    assert finished(workdir / "artifacts" / stage) == []

    rerun = subprocess.run([DISTILFLOW, "run", str(TINY_CONFIG), "--set", f"run.workdir={workdir}"],
                           capture_output=True, text=True, env=os.environ.copy())
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert_only_redone(workdir, stage)


STAGES = ["prototype", "distill", "compress", "deploy"]


def assert_only_redone(workdir: Path, stage: str) -> None:
    """The newest run reused every stage before ``stage``, redid ``stage`` and left one finished copy of it."""
    cached = stages_cached_in_newest_run(workdir)
    before = STAGES[:STAGES.index(stage)]
    assert all(cached[name] == "true" for name in before)
    assert cached[stage] == "false"
    assert len(finished(workdir / "artifacts" / stage)) == 1
    assert not any(".partial-" in p.name for p in (workdir / "artifacts" / stage).iterdir())


def group_members(pgid: int) -> list[str]:
    """Command lines of the live processes in process group ``pgid`` (zombies excluded)."""
    return list(_group(pgid).values())


def group_pids(pgid: int) -> list[int]:
    return list(_group(pgid))


def _group(pgid: int) -> dict[int, str]:
    members = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            state, _, group = stat.read_text().rsplit(")", 1)[1].split()[:3]
            command = (stat.parent / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue  # gone meanwhile
        if int(group) == pgid and state != "Z":
            members[int(stat.parent.name)] = command
    return members


def mlflow_runs(workdir: Path) -> list:
    from mlflow import MlflowClient

    client = MlflowClient(f"sqlite:///{workdir / 'mlflow.db'}")
    return client.search_runs([e.experiment_id for e in client.search_experiments()])


@pytest.mark.parametrize("sig, stage", [(signal.SIGTERM, "distill"), (signal.SIGINT, "compress")],
                         ids=["sigterm-in-distill", "sigint-in-compress"])
def test_a_signal_mid_stage_stops_the_run_its_prefect_server_and_its_mlflow_runs(tmp_path, sig, stage, tiny_prototype,
                                                                                tiny_distill):
    """The signal goes to `distilflow run` alone (as `kill PID` or a scheduler sends it), not to its group. The
    stages before ``stage`` are the session's (reused)."""
    workdir = with_stages(tmp_path / "work", tiny_prototype, *([tiny_distill] if stage == "compress" else []))
    run = start_run(workdir, *(LONG_DISTILL if stage == "distill" else ()))
    try:
        kill_when_partial(run, workdir / "artifacts" / stage, sig=sig, group=False)
        assert run.returncode == 128 + sig
        output = run.stdout.read().decode()
        assert f"stopped by {signal.Signals(sig).name}" in output and "Traceback" not in output
        time.sleep(1)
        assert group_members(run.pid) == []  # no temporary Prefect server left listening
        runs = mlflow_runs(workdir)
        status = {r.data.tags.get("distilflow.stage", "pipeline"): r.info.status for r in runs
                  if "distilflow.phase" not in r.data.tags}  # a training phase's run carries its stage's tag too
        assert status["pipeline"] == status[stage] == "KILLED"
        assert {r.info.status for r in runs} <= {"FINISHED", "KILLED"}
        assert finished(workdir / "artifacts" / stage) == []
    finally:
        if group_members(run.pid):
            os.killpg(run.pid, signal.SIGKILL)


def test_a_kill_9_mid_stage_leaves_nothing_finished_and_the_rerun_redoes_it_and_closes_what_it_left_running(
        tmp_path, tiny_prototype):
    workdir = with_stages(tmp_path / "work", tiny_prototype)
    kill_when_partial(start_run(workdir), workdir / "artifacts" / "distill")
    assert finished(workdir / "artifacts" / "distill") == []
    left = [r for r in mlflow_runs(workdir) if r.info.status == "RUNNING"]
    assert {r.info.run_name for r in left} >= {"distill"}

    rerun = subprocess.run([DISTILFLOW, "run", str(TINY_CONFIG), "--set", f"run.workdir={workdir}"],
                           capture_output=True, text=True, env=os.environ.copy())
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert_only_redone(workdir, "distill")
    closed = {r.info.run_id: r for r in mlflow_runs(workdir)}
    for run in left:
        assert closed[run.info.run_id].info.status == "KILLED"
        assert "ended without closing it" in closed[run.info.run_id].data.tags["distilflow.end_reason"]
    assert "was left RUNNING by a killed run" in rerun.stderr
    assert not any(r.info.status == "RUNNING" for r in closed.values())


def server_records() -> set[Path]:
    """The records of the temporary Prefect servers of the live (or killed) runs of this session."""
    return set((Path(os.environ["DISTILFLOW_HOME"]) / "prefect-servers").glob("*.json"))


def started_prefect_server(run: subprocess.Popen, before: set[Path]) -> tuple[Path, int]:
    """The record and pid of the temporary Prefect server ``run`` started (its record is new since ``before``)."""
    deadline = time.monotonic() + 180
    while not server_records() - before:
        assert time.monotonic() < deadline and run.poll() is None, "the temporary server never started"
        time.sleep(0.2)
    [record] = server_records() - before
    return record, int(record.stem)


def gone_within(pgid: int, seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while group_members(pgid) and time.monotonic() < deadline:
        time.sleep(0.2)
    return not group_members(pgid)


def test_the_next_run_stops_the_prefect_server_a_kill_9_left_behind(tmp_path):
    """Where no guard stopped the orphan (another OS, or the guard killed too), the next run does."""
    before = server_records()
    run = start_run(tmp_path / "work")
    record, server = started_prefect_server(run, before)
    for member in group_pids(run.pid):
        if member not in (run.pid, server):
            os.kill(member, signal.SIGKILL)  # the guard
    os.kill(run.pid, signal.SIGKILL)
    run.wait()
    try:
        assert group_members(run.pid)  # the orphan still listens
        later = subprocess.run([DISTILFLOW, "run", str(tmp_path / "no-such.yaml")], capture_output=True, text=True,
                               env=os.environ.copy(), timeout=120)
        assert later.returncode == 2 and f"stopped the temporary Prefect server (pid {server})" in later.stderr
        assert gone_within(run.pid, 30) and not record.exists()
    finally:
        if group_members(run.pid):
            os.killpg(run.pid, signal.SIGKILL)


def test_a_kill_9_while_the_temporary_prefect_server_starts_leaves_no_server(tmp_path):
    """The guard watches the server from the moment its process exists, not from when it first answers (seconds
    later on a busy machine): the chaos test's SIGKILL once landed in between and the server outlived the run."""
    run = start_run(tmp_path / "work")
    try:
        server = guarded_before_it_answers(run)
        os.kill(run.pid, signal.SIGKILL)
        run.wait()
        deadline = time.monotonic() + 10
        while server in group_pids(run.pid) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert server not in group_pids(run.pid)
    finally:
        if group_members(run.pid):
            os.killpg(run.pid, signal.SIGKILL)


def guarded_before_it_answers(run: subprocess.Popen) -> int:
    """The pid of ``run``'s temporary Prefect server, once a guard watches it and before it answers."""
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline and run.poll() is None:
        members = _group(run.pid)
        for pid, command in members.items():
            if "prefect.server.api.server:create_app" in command:
                port = command.split("--port ")[1].split()[0]
                assert not answers(f"http://127.0.0.1:{port}/api/health"), "the server answered before a guard watched it"
                if any(f"kill -0 {pid}" in other for other in members.values()):
                    return pid
        time.sleep(0.02)
    pytest.fail("the run started no temporary Prefect server")


def answers(url: str) -> bool:
    try:
        urllib.request.urlopen(url, timeout=1).close()
        return True
    except OSError:
        return False


def test_a_prefect_home_where_nothing_can_be_written_is_named_before_the_server_starts(tmp_path):
    (tmp_path / "a-file").write_text("")
    done = subprocess.run([DISTILFLOW, "run", str(TINY_CONFIG), "--set", f"run.workdir={tmp_path / 'work'}"],
                          capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PREFECT_HOME": str(tmp_path / "a-file" / "prefect")})
    assert done.returncode == 2
    assert f"error: PREFECT_HOME {tmp_path / 'a-file' / 'prefect'}: cannot write in {tmp_path / 'a-file'}" in done.stderr
