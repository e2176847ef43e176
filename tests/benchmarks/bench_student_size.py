"""The student-size study (issue 14): how small can the student get, and at what task score?

Runs configs/student-size-study.yaml once per student, each as a user would (`distilflow run`, its own
process): distill.student.teacher_layers 20, 12, 8, 6 with the vocabulary trimmed, and 8 with the full
vocabulary. Every run distils with the same budget (the demo's SFT), measures every compression candidate
(bf16, W4A16, width-pruned + healed + W4A16) with the shared evaluator, and shares the workdir, so the
teacher's answers are computed once. Each candidate is also exported to GGUF with the bundle's exporter
(every type it knows of q8_0 and q4_0). Across all candidates, the existing Pareto choice
(``compress.choose``) picks the smallest that is 10x smaller than the teacher in bf16 and keeps its task
score (retention >= 1.0 vs the teacher).

    flock /tmp/heavy.lock .venv/bin/python -m tests.benchmarks.bench_student_size \\
        --out tests/benchmarks/results/student_size.json [--students 20:trim 8:full] [--workdir DIR] [--config C]
"""

import argparse
import dataclasses
import json
import os
import platform
import subprocess
import sys
import tempfile
from datetime import date
from pathlib import Path

from mlflow import MlflowClient

from distilflow.configs.loader import load_config
from distilflow.configs.schema import BudgetConfig
from distilflow.flows.cli import ENV_DEFAULTS
from distilflow.tasks import compress, gguf_export, journey
from distilflow.tasks.errors import DistilflowError
from tests.benchmarks.bench_cpu import stage_seconds, timed

REPO = Path(__file__).resolve().parents[2]
CONFIG = REPO / "configs" / "student-size-study.yaml"
STUDENTS = ["20:trim", "12:trim", "8:trim", "6:trim", "8:full"]
GGUF_TYPES = [kind for kind in ("q8_0", "q4_0") if kind in gguf_export.GGUF_TYPES]


def run_student(config: Path, layers: int, vocabulary: str, workdir: list[str], env: dict) -> dict:
    """One `distilflow run` of the study config for this student: its report, wall time and stage times."""
    distilflow = str(Path(sys.executable).with_name("distilflow"))
    wall_s, _ = timed([distilflow, "run", str(config), "--set", f"distill.student.teacher_layers={layers}",
                       "--set", f"distill.student.vocabulary={vocabulary}", *workdir], env)
    report = json.loads(subprocess.run([distilflow, "report", "--latest", "--json"], capture_output=True,
                                       text=True, env=env, check=True).stdout)
    return {"student": f"{layers} layers, {vocabulary} vocabulary", "wall_s": wall_s,
            "stage_seconds": stage_seconds(report), "report": report}


def compress_dir(report: dict, workdir: Path) -> Path:
    """The run's compress artifact: its MLflow child run names the cache key."""
    client = MlflowClient(report["mlflow_tracking_uri"])
    parent = client.get_run(report["mlflow_run_id"])
    child = client.search_runs([parent.info.experiment_id],
                               filter_string=f"tags.mlflow.parentRunId = '{parent.info.run_id}' "
                                             "and tags.`distilflow.stage` = 'compress'")[0]
    return workdir / "artifacts" / "compress" / child.data.tags["distilflow.cache_key"]


def candidate_rows(directory: Path, scratch: Path) -> list[dict]:
    """The run's candidates (candidates.json) with their shape and their GGUF sizes."""
    rows = json.loads((directory / "candidates.json").read_text())["candidates"]
    for row in rows:
        model_dir = directory / "candidates" / row["candidate"]
        config = json.loads((model_dir / "config.json").read_text())
        row.update({"layers": config["num_hidden_layers"], "mlp": config["intermediate_size"],
                    "vocabulary": config["vocab_size"]})
        for kind in GGUF_TYPES:
            out = gguf_export.export(model_dir, scratch / f"{kind}.gguf", kind, name="student")
            row[f"gguf_{kind}_bytes"] = out.stat().st_size
            out.unlink()
    return rows


def choice(rows: list[dict], teacher: dict) -> dict:
    """The smallest candidate 10x smaller than the teacher in bf16 that keeps its task score, if any."""
    budget = BudgetConfig(max_size_bytes=int(teacher["size_bytes"] / 10), min_retention=1.0)
    fields = {f.name for f in dataclasses.fields(compress.Candidate)}
    candidates = []
    for row in rows:
        row["retention_vs_teacher"] = row["task_score"] / teacher["task_score"]
        row["meets_goal"] = compress.meets(row["size_bytes"], row["retention_vs_teacher"], budget)
        candidates.append(compress.Candidate(**{**{k: v for k, v in row.items() if k in fields},
                                                "candidate": f"{row['student']}: {row['candidate']}",
                                                "meets_budget": row["meets_goal"]}))
    try:
        chosen = compress.choose(candidates, budget)
    except DistilflowError:
        return {"budget": budget.model_dump(), "chosen": None}
    return {"budget": budget.model_dump(), "chosen": chosen.candidate}


def table(rows: list[dict], teacher: dict) -> str:
    gguf = "".join(f" GGUF {kind} (MB) |" for kind in GGUF_TYPES)
    lines = [f"| student | candidate | layers | MLP | vocabulary | params (M) | safetensors (MB) |{gguf} task score | "
             "retention vs teacher | distill (s) | quantize (s) |",
             "|---|---|---|---|---|---|---|" + "---|" * len(GGUF_TYPES) + "---|---|---|---|",
             f"| teacher | – | – | – | – | {teacher['params'] / 1e6:.1f} | {teacher['size_bytes'] / 1e6:.1f} |"
             + " – |" * len(GGUF_TYPES) + f" {teacher['task_score']:.3f} | 1.00 | – | – |"]
    for r in rows:
        sizes = "".join(f" {r[f'gguf_{kind}_bytes'] / 1e6:.1f} |" for kind in GGUF_TYPES)
        lines.append(f"| {r['student']} | {r['candidate']} | {r['layers']} | {r['mlp']} | {r['vocabulary']} | "
                     f"{r['params'] / 1e6:.1f} | {r['size_bytes'] / 1e6:.1f} |{sizes} {r['task_score']:.3f} | "
                     f"{r['retention_vs_teacher']:.2f} | {r['distill_s']:.0f} | {r['quantize_s']:.0f} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path, required=True, help="the result (JSON)")
    parser.add_argument("--students", nargs="+", default=STUDENTS, help="LAYERS:trim|full, one run each")
    parser.add_argument("--config", type=Path, default=CONFIG)
    parser.add_argument("--workdir", type=Path, help="default: the config's (shared with make demo)")
    args = parser.parse_args()
    scratch = Path(tempfile.mkdtemp(prefix="distilflow-size-"))
    env = {**os.environ, "DISTILFLOW_HOME": str(scratch / "home"), "PREFECT_HOME": str(scratch / "prefect"),
           "OMP_WAIT_POLICY": os.environ.get("OMP_WAIT_POLICY", ENV_DEFAULTS["OMP_WAIT_POLICY"])}
    env.pop("MLFLOW_TRACKING_URI", None)
    workdir = args.workdir or load_config(args.config).run.workdir

    runs, rows = [], []
    for student in args.students:
        layers, vocabulary = student.split(":")
        run = run_student(args.config, int(layers), vocabulary, ["--set", f"run.workdir={workdir}"], env)
        runs.append(run)
        rows += [{**row, "student": run["student"], "distill_s": run["stage_seconds"]["distill"]}
                 for row in candidate_rows(compress_dir(run["report"], workdir), scratch)]
        print(f"{run['student']}: {run['wall_s']:.0f} s", flush=True)
    teacher = journey.find(journey.from_json(runs[0]["report"]["journey"]), "teacher").as_json()
    result = {"date": date.today().isoformat(),
              "device": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, no GPU",
              "teacher": teacher, "choice": choice(rows, teacher), "candidates": rows,
              "runs": [{k: v for k, v in run.items() if k != "report"} | {"journey": run["report"]["journey"]}
                       for run in runs]}
    args.out.write_text(json.dumps(result, indent=1))
    print(table(rows, teacher))
    print(json.dumps(result["choice"]))


if __name__ == "__main__":
    main()
