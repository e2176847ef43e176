"""Chaos: the tiny pipeline killed at seeded random moments, again and again, each time re-run from where it was.

`distilflow run` gets SIGKILL (its whole process group, as a lost machine or a container stop; or the run's process
alone, as the OOM killer), SIGTERM or SIGINT at a random moment of its run, N times in a row; each re-run starts
from what the killed one left. Every re-run ends killed or complete (never failing on what a kill left behind),
every complete run's journey equals an uninterrupted run's on the same seed (task scores and sizes), no process a
run started outlives it by more than 10 s, and no MLflow run stays RUNNING. The same for `distilflow serve` stopped
mid-run: its flow run ends Cancelled or Crashed and the deployment's concurrency slot is free within 10 s.

A process is the run's if it carries the run's tag in its environment (every process distilflow starts inherits
it: the temporary Prefect server, llama.cpp servers, fresh-process evaluators, training workers). Each test writes
its numbers to chaos-*.json in its tmp_path and prints them (`pytest -s`)."""

import json
import os
import random
import signal
import subprocess
import sys
import time
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path

import pytest

from tests.conftest import TINY_CONFIG
from tests.test_crash import mlflow_runs, start_run
from tests.test_prefect_server import STARTUP_S, _polled, prefect_client, server, wait_for  # noqa: F401 (a fixture)

ORPHAN_LIMIT_S = 10
KILLS = ["SIGKILL to the group", "SIGKILL to the run", "SIGTERM", "SIGINT"]
# What each kill's exit looks like: the CLI's code for the signal it handled, or (before it handles them, in its
# first second) the signal's death, which a shell shows as the same code.
KILLED_EXITS = {"SIGKILL to the group": {-signal.SIGKILL}, "SIGKILL to the run": {-signal.SIGKILL},
                "SIGTERM": {128 + signal.SIGTERM, -signal.SIGTERM}, "SIGINT": {128 + signal.SIGINT, -signal.SIGINT}}
# The journey's fields that must come out the same from the same seed, killed or not.
COMPARED = ("task_score", "task_score_ci", "size_bytes", "params", "bits_per_param")


def tagged(tag: str) -> list[int]:
    """The pids of the live processes whose environment carries ``tag`` (DISTILFLOW_TEST_RUN=tag)."""
    needle = f"DISTILFLOW_TEST_RUN={tag}".encode()
    found = []
    for environ in Path("/proc").glob("[0-9]*/environ"):
        try:
            if needle in environ.read_bytes().split(b"\0") and _state(environ.parent) != "Z":
                found.append(int(environ.parent.name))
        except OSError:
            continue  # gone meanwhile, or not ours to read
    return found


def _state(proc: Path) -> str:
    return (proc / "stat").read_text().rsplit(")", 1)[1].split()[0]


def outlived(tag: str, exited: float, how: str = "") -> float:
    """Seconds the processes of the run tagged ``tag`` outlived it (it exited at ``exited``, ended ``how``): at most
    10."""
    while tagged(tag) and time.monotonic() - exited < ORPHAN_LIMIT_S + 5:
        time.sleep(0.2)
    left = [Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode() for pid in tagged(tag)]
    seconds = time.monotonic() - exited
    assert seconds <= ORPHAN_LIMIT_S and not left, (how, seconds, left)
    return seconds


def journey(workdir: Path) -> list[dict]:
    """The compared fields of each state of the newest finished run in ``workdir``."""
    newest = max((workdir / "runs").glob("*.json"), key=lambda p: p.stat().st_mtime)
    return [{"state": e["state"], "phase": e.get("phase"), **{k: e.get(k) for k in COMPARED}}
            for e in json.loads(newest.read_text())["journey"]]


@dataclass
class Tally:
    kills: dict[str, int] = field(default_factory=dict)  # by kind of kill
    reruns: int = 0  # runs started on what a killed one left
    completed: int = 0
    identical_journeys: int = 0
    orphan_seconds: list[float] = field(default_factory=list)  # per run: how long its processes outlived it
    seconds: float = 0.0

    def report(self, path: Path) -> dict:
        numbers = {**asdict(self), "kills_total": sum(self.kills.values()),
                   "max_orphan_seconds": round(max(self.orphan_seconds, default=0.0), 1)}
        path.write_text(json.dumps(numbers, indent=1))
        print(f"\n{path.name}: {json.dumps(numbers)}")
        return numbers



def tagged_run(workdir: Path, tag: str, output: Path) -> subprocess.Popen:
    return start_run(workdir, output=output, env={**os.environ, "DISTILFLOW_TEST_RUN": tag})


def kill(process: subprocess.Popen, how: str) -> None:
    if how == "SIGKILL to the group":
        os.killpg(process.pid, signal.SIGKILL)
    else:
        os.kill(process.pid, signal.SIGKILL if how == "SIGKILL to the run" else getattr(signal, how))


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory) -> tuple[list[dict], float]:
    """The journey of a run nothing interrupts, and how long it took."""
    workdir = tmp_path_factory.mktemp("uninterrupted") / "work"
    start = time.monotonic()
    run = tagged_run(workdir, uuid.uuid4().hex, workdir.parent / "run.log")
    assert run.wait(timeout=1800) == 0, (workdir.parent / "run.log").read_text()[-4000:]
    return journey(workdir), time.monotonic() - start


@pytest.mark.parametrize("kills", [3, pytest.param(20, marks=pytest.mark.slow)], ids=lambda n: f"{n}-kills")
def test_a_run_killed_at_random_moments_always_resumes_to_the_uninterrupted_journey(uninterrupted, tmp_path, kills):
    """Each run is killed at a moment drawn from the uninterrupted run's length; one that ends first must have
    completed with the uninterrupted journey, and a fresh workdir is killed next. After the last kill, the run
    goes to the end. The processes of each run must be gone 10 s after it exited: with SIGKILL to the run alone,
    its temporary Prefect server is orphaned, and its guard stops it."""
    reference, duration = uninterrupted
    rng = random.Random(kills)  # seeded: the same moments and signals each time
    tally, workdir, resumed, previous, began = Tally(), tmp_path / "work-0", False, None, time.monotonic()
    for number in range(10 * kills):
        tag, log = uuid.uuid4().hex, tmp_path / f"run-{number}.log"
        run, started = tagged_run(workdir, tag, log), time.monotonic()
        tally.reruns += resumed
        if previous:
            tally.orphan_seconds.append(outlived(*previous))  # the run before's, while this one starts
        if sum(tally.kills.values()) == kills:
            break
        how, moment = rng.choice(KILLS), rng.uniform(1.0, duration)
        try:
            run.wait(timeout=max(0.1, moment - (time.monotonic() - started)))
        except subprocess.TimeoutExpired:
            kill(run, how)
            # Exit 0 after the kill: it landed while the finished run was exiting (its work all published).
            if run.wait(timeout=300) != 0:
                assert run.returncode in KILLED_EXITS[how], (how, log.read_text()[-4000:])
                previous, resumed = (tag, time.monotonic(), how), True
                tally.kills[how] = tally.kills.get(how, 0) + 1
                continue
        previous = (tag, time.monotonic())
        assert run.returncode == 0, log.read_text()[-4000:]  # it ended before the kill: complete, never failed
        completed(tally, workdir, reference)
        workdir, resumed = tmp_path / f"work-{tally.completed}", False  # kill a fresh run next
    else:
        pytest.fail(f"{kills} kills did not land in {10 * kills} runs")
    assert run.wait(timeout=1800) == 0, log.read_text()[-4000:]
    completed(tally, workdir, reference)
    tally.orphan_seconds.append(outlived(tag, time.monotonic()))
    stores = [store.parent for store in tmp_path.glob("work-*/mlflow.db")]
    assert "RUNNING" not in {each.info.status for store in stores for each in mlflow_runs(store)}
    tally.seconds = time.monotonic() - began
    tally.report(tmp_path / f"chaos-run-{kills}.json")


def completed(tally: Tally, workdir: Path, reference: list[dict]) -> None:
    tally.completed += 1
    tally.identical_journeys += journey(workdir) == reference
    assert journey(workdir) == reference


STOPS = ["SIGTERM", "SIGINT to the group"]  # `kill PID` or systemd; Ctrl-C in serve's terminal


@pytest.mark.slow
def test_serve_stopped_at_random_moments_ends_each_flow_run_and_frees_its_slot_within_10_s(server, tmp_path):
    """`distilflow serve` started, a run triggered, serve stopped at a seeded random moment of the run; six times,
    on one workdir (each run resumes what the one before left)."""
    rng, workdir, stops = random.Random(6), tmp_path / "work", []
    for number in range(6):
        tag, log, how = uuid.uuid4().hex, tmp_path / f"serve-{number}.log", rng.choice(STOPS)
        env = {**os.environ, "PREFECT_API_URL": server["url"], "PREFECT_HOME": str(server["home"] / "client"),
               "PREFECT_RUNNER_POLL_FREQUENCY": "1", "DISTILFLOW_TEST_RUN": tag}
        with open(log, "w") as out:
            serve = subprocess.Popen([sys.executable, "-m", "distilflow.flows.cli", "serve", str(TINY_CONFIG), "--name",
                                      "chaos", "--set", f"run.workdir={workdir}"], env=env, stdout=out,
                                     stderr=subprocess.STDOUT, start_new_session=True)
        try:
            with prefect_client(server) as client:
                deployment = wait_for(lambda: _polled(client, "distilflow/chaos"), "serve", STARTUP_S, serve, log)
                flow_run = client.create_flow_run_from_deployment(deployment.id)
                wait_for(lambda: client.read_flow_run(flow_run.id).state.is_running(), "the run starts", STARTUP_S,
                         serve, log)
                time.sleep(rng.uniform(1.0, 90.0))
                (os.kill if how == "SIGTERM" else os.killpg)(serve.pid, signal.SIGTERM if how == "SIGTERM" else
                                                             signal.SIGINT)
                assert serve.wait(timeout=120) == 0, log.read_text()[-4000:]
                stopped = time.monotonic()
                ended = wait_for(lambda: ended_and_free(client, flow_run.id, deployment.id), "the run ends and its "
                                 "slot is free", ORPHAN_LIMIT_S, log=log)
                assert ended.type.value in ("CANCELLED", "CRASHED", "COMPLETED"), ended
            stops.append({"stop": how, "state": ended.name, "ended_and_free_after_s": round(time.monotonic() - stopped, 1),
                          "orphan_seconds": round(outlived(tag, stopped), 1)})
        finally:
            if serve.poll() is None or tagged(tag):
                os.killpg(serve.pid, signal.SIGKILL)
    (tmp_path / "chaos-serve.json").write_text(json.dumps(stops, indent=1))
    print(f"\nchaos-serve.json: {json.dumps(stops)}")


def ended_and_free(client, flow_run_id, deployment_id):
    """The flow run's final state once it has one and the deployment's concurrency slot is free again."""
    state = client.read_flow_run(flow_run_id).state
    free = client.read_deployment(deployment_id).global_concurrency_limit.active_slots == 0
    return state if state.is_final() and free else None
