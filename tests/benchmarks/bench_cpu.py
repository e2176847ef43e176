"""CPU benchmarks 1 and 4 (`make bench-cpu`): the journey of the embedded default, and what
orchestration costs.

Three runs of configs/demo.yaml, each in its own process, as a user would start them:
  orchestrated  `distilflow run` (Prefect flow runs + MLflow tracking), fresh workdir
  direct        the same stage functions called in a loop, no Prefect, no MLflow, fresh workdir
  cached        `distilflow run` again on the orchestrated workdir: every stage reused
Writes tests/benchmarks/cpu-results.json; docs/results/orchestration.md quotes it.
"""

import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

from distilflow.flows.cli import ENV_DEFAULTS
from distilflow.tasks import journey

REPO = Path(__file__).resolve().parents[2]
CONFIG = REPO / "configs" / "demo.yaml"
RESULT = Path(__file__).with_name("cpu-results.json")


def timed(command: list[str], env: dict) -> tuple[float, str]:
    start = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True, env=env, cwd=REPO)
    elapsed = time.perf_counter() - start
    if done.returncode != 0:
        sys.exit(f"{' '.join(command)} failed:\n{done.stderr[-4000:]}")
    return elapsed, done.stdout


def stage_seconds(report: dict) -> dict[str, float]:
    """Each stage's wall time in the orchestrated run: its MLflow child run's start to end."""
    from mlflow import MlflowClient

    client = MlflowClient(report["mlflow_tracking_uri"])
    parent = client.get_run(report["mlflow_run_id"])
    children = client.search_runs([parent.info.experiment_id],
                                  filter_string=f"tags.mlflow.parentRunId = '{parent.info.run_id}'")
    return {run.info.run_name: (run.info.end_time - run.info.start_time) / 1000 for run in children}


def main() -> None:
    scratch = Path(tempfile.mkdtemp(prefix="distilflow-bench-"))
    # Both arms with the OpenMP wait policy `distilflow run` sets, so that only orchestration differs.
    env = {**os.environ, "DISTILFLOW_HOME": str(scratch / "home"), "PREFECT_HOME": str(scratch / "prefect"),
           "OMP_WAIT_POLICY": os.environ.get("OMP_WAIT_POLICY", ENV_DEFAULTS["OMP_WAIT_POLICY"])}
    env.pop("MLFLOW_TRACKING_URI", None)
    cli = [str(Path(sys.executable).with_name("distilflow")), "run", str(CONFIG)]
    orchestrated_dir, direct_dir = scratch / "orchestrated", scratch / "direct"

    orchestrated_s, _ = timed(cli + ["--set", f"run.workdir={orchestrated_dir}"], env)
    report = json.loads(subprocess.run(
        [str(Path(sys.executable).with_name("distilflow")), "report", "--latest", "--json"],
        capture_output=True, text=True, env=env, check=True).stdout)
    direct_s, _ = timed([sys.executable, "-m", "tests.benchmarks.stages_direct", str(CONFIG),
                         "--set", f"run.workdir={direct_dir}", "--out", str(scratch / "direct.json")], env)
    cached_s, _ = timed(cli + ["--set", f"run.workdir={orchestrated_dir}"], env)

    states = journey.from_json(report["journey"])
    teacher, deployed = journey.find(states, "teacher"), journey.find(states, "deployed")
    result = {
        "date": date.today().isoformat(), "device": f"{platform.processor() or platform.machine()}, "
                                                    f"{os.cpu_count()} cores, no GPU",
        "journey": report["journey"],
        "retention": deployed.task_score / teacher.task_score,
        "size_reduction_vs_teacher_bf16": teacher.size_bytes / deployed.size_bytes,
        "orchestrated_s": orchestrated_s, "direct_s": direct_s, "cached_rerun_s": cached_s,
        "stage_seconds": {"orchestrated": stage_seconds(report),
                          "direct": json.loads((scratch / "direct.json").read_text())["stage_seconds"]},
        "orchestration_overhead_s": orchestrated_s - direct_s,
        "orchestration_overhead_fraction": (orchestrated_s - direct_s) / direct_s,
        "cached_fraction_of_first": cached_s / orchestrated_s,
    }
    RESULT.write_text(json.dumps(result, indent=1))
    print(json.dumps({k: v for k, v in result.items() if k != "journey"}, indent=1))


if __name__ == "__main__":
    main()
