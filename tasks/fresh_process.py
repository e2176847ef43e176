"""A module's work in a new Python process, asked with a JSON request and answered with JSON.

A fresh process proves what is on disk (a saved model loads and answers without this process's
objects in memory), and ``accelerate launch`` starts one per GPU to train on several.
"""

import ctypes
import json
import os
import signal
import subprocess
import sys
import tempfile
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path


def call(module: str, request: dict, *, launcher: Sequence[str] = (sys.executable,),
         env: Mapping[str, str] | None = None, timeout_s: float | None = None) -> dict | None:
    """Run ``LAUNCHER -m MODULE REQUEST.json ANSWER.json`` and return the answer ``module`` wrote (None if none).

    ``module`` ends with ``fresh_process.main(function)``. A failed process raises
    ``subprocess.CalledProcessError``, its ``stderr`` the process's; one past ``timeout_s``, ``TimeoutExpired``.
    """
    with tempfile.TemporaryDirectory() as scratch:
        request_file, answer_file = Path(scratch) / "request.json", Path(scratch) / "answer.json"
        request_file.write_text(json.dumps(request))
        subprocess.run([*launcher, "-m", module, str(request_file), str(answer_file)], capture_output=True,
                       text=True, env=env, timeout=timeout_s, check=True, preexec_fn=end_with_parent)
        return json.loads(answer_file.read_text()) if answer_file.is_file() else None


def main(function: Callable[[dict], dict | None]) -> None:
    """The worker's side of ``call``: ``function(request)``, its answer written where ``call`` reads it."""
    end_with_parent()
    request_file, answer_file = sys.argv[1:3]
    answer = function(json.loads(Path(request_file).read_text()))
    if answer is not None:
        Path(answer_file).write_text(json.dumps(answer))


PR_SET_PDEATHSIG = 1  # linux/prctl.h
# Looked up here, not in the child: a preexec_fn runs between fork and exec, where loading a library or importing
# a module can deadlock on a lock another thread of the parent held at the fork.
_libc = ctypes.CDLL(None) if sys.platform == "linux" else None


def end_with_parent(signal_number: int = signal.SIGKILL) -> None:
    """This process gets ``signal_number`` when the one that started it dies (Linux): a run killed with SIGKILL
    cannot stop its workers and servers itself, and nothing they do is of use without it.

    Given as a child's ``preexec_fn`` it is set before the child runs any of its code (the signal is kept across
    exec), so a parent killed while the child still imports its libraries ends the child too."""
    if _libc is not None:
        _libc.prctl(PR_SET_PDEATHSIG, signal_number)


def stop_when_this_process_dies(pid: int) -> None:
    """On Linux, a guard that stops ``pid`` within seconds of this process's death, SIGKILL included: for
    a child another library starts, which cannot be told to end with its parent. The guard ends with ``pid``."""
    if sys.platform != "linux":
        return
    # The guard polls its owner each second rather than waiting for a parent-death signal: a signal that came before
    # sh had set its trap ended the guard and left the child (a run killed the moment its server started). Then
    # SIGTERM, and SIGKILL 3 s later if the child is still shutting down (as Prefect's own stop does, with 5 s).
    stop = f"kill {pid}; for i in 1 2 3; do sleep 1; kill -0 {pid} || exit 0; done; kill -9 {pid}"
    guard = f"while kill -0 {os.getpid()} && kill -0 {pid}; do sleep 1; done 2>/dev/null; {stop}"
    _guards.append(subprocess.Popen(["sh", "-c", guard], stdin=subprocess.DEVNULL, stderr=subprocess.DEVNULL))


_guards: list[subprocess.Popen] = []  # held until exit: a collected Popen of a live process warns
