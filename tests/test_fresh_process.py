"""Work in a new Python process: a JSON request in, a JSON answer out, the process's error when it fails."""

import contextlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from distilflow.tasks import fresh_process


def test_a_failed_process_raises_with_its_stderr():
    with pytest.raises(subprocess.CalledProcessError) as failed:
        fresh_process.call("distilflow.no_such_module", {"x": 1})
    assert "No module named distilflow.no_such_module" in failed.value.stderr


@pytest.mark.skipif(sys.platform != "linux", reason="the parent-death signal is Linux's")
def test_a_child_the_guard_watches_is_stopped_within_seconds_of_its_parent_s_kill_9():
    """As `distilflow run` killed with SIGKILL, whose temporary Prefect server another library started."""
    parent = subprocess.Popen([sys.executable, "-c", """
import subprocess, sys, time
from distilflow.tasks.fresh_process import stop_when_this_process_dies
child = subprocess.Popen(["sleep", "120"])
stop_when_this_process_dies(child.pid)
print(child.pid, flush=True)
time.sleep(120)
"""], stdout=subprocess.PIPE, text=True, start_new_session=True)
    child = int(parent.stdout.readline())
    time.sleep(0.5)  # the guard has started
    assert ends_within_seconds_of_its_parent_s_kill_9(child, parent)


@pytest.mark.skipif(sys.platform != "linux", reason="the parent-death signal is Linux's")
def test_a_worker_still_importing_when_its_parent_is_killed_9_ends_with_it():
    """The worker's parent-death signal is set before its own code runs: a worker that never reaches
    `fresh_process.main` (here it only sleeps, as one importing torch for seconds would) still ends."""
    parent = subprocess.Popen([sys.executable, "-c", """
import sys, threading, time
from distilflow.tasks import fresh_process
worker = [sys.executable, "-c", "import os, time; print(os.getpid(), flush=True); time.sleep(120)"]
threading.Thread(target=fresh_process.call, args=("any.module", {}), kwargs={"launcher": worker}, daemon=True).start()
time.sleep(120)
"""], start_new_session=True)
    assert ends_within_seconds_of_its_parent_s_kill_9(_first_child(parent.pid), parent)


def ends_within_seconds_of_its_parent_s_kill_9(pid: int, parent: subprocess.Popen, seconds: float = 5) -> bool:
    """kill -9 of ``parent`` (in a session of its own), then whether ``pid`` ended within ``seconds``."""
    try:
        os.kill(parent.pid, signal.SIGKILL)
        parent.wait()
        deadline = time.monotonic() + seconds
        while _alive(pid) and time.monotonic() < deadline:
            time.sleep(0.1)
        return not _alive(pid)
    finally:
        with contextlib.suppress(ProcessLookupError):  # nothing of its group left
            os.killpg(parent.pid, signal.SIGKILL)


def _first_child(pid: int, timeout_s: float = 30) -> int:
    """The first process started by any thread of ``pid``."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        children = [child for thread in Path(f"/proc/{pid}/task").iterdir()
                    for child in (thread / "children").read_text().split()]
        if children:
            return int(children[0])
        time.sleep(0.1)
    raise AssertionError(f"process {pid} started no child in {timeout_s} s")


def _alive(pid: int) -> bool:
    """Running, and not a zombie waiting for its (dead) parent's reaper."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False
