"""Two pipeline runs at once on one workdir: each stage is computed once, the other run waits for it
and reuses it, and neither corrupts the other."""

import os
import subprocess
import sys
from pathlib import Path

from distilflow.tasks import artifacts
from tests.conftest import TINY_CONFIG

DISTILFLOW = str(Path(sys.executable).with_name("distilflow"))


def test_two_runs_on_one_workdir_share_each_stage_and_both_succeed(tmp_path):
    workdir = tmp_path / "work"
    command = [DISTILFLOW, "run", str(TINY_CONFIG), "--set", f"run.workdir={workdir}"]
    runs = [subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                             env=os.environ.copy()) for _ in range(2)]
    outputs = [run.communicate(timeout=900) for run in runs]
    for run, (out, err) in zip(runs, outputs):
        assert run.returncode == 0, err[-3000:]
    for stage in ("prototype", "distill", "compress", "deploy"):
        published = [p for p in (workdir / "artifacts" / stage).iterdir() if p.is_dir()]
        assert len(published) == 1, f"{stage}: {published}"
        assert artifacts.manifest_problems(published[0]) == []
    bundles = {line.split()[-1] for out, _ in outputs for line in out.splitlines() if line.startswith("bundle:")}
    assert len(bundles) == 1
