"""The recipe study (configs/recipe-study.yaml): which way of learning from the teacher alone works best.

For each label-free filter of the teacher's answers (none, teacher confidence, teacher confidence per label,
agreement across samples, the judge), the prototype and distill stages run on the study config; distill's phases (sft, then logit KD
on the teacher's soft labels, then GRPO rewarded by agreement with the teacher) give one row each. Every
student is scored on the same 400 held-out tickets, with a 95% confidence interval. Stages are cached by
content in the workdir, so an interrupted study resumes and the filters share what they can.

    python -m tests.benchmarks.bench_recipes --out tests/benchmarks/results/recipes.json \\
        [--workdir runs/demo] [--only none confidence] [--set distill.student.teacher_layers=8]

Besides the scores it reports how right the kept answers are: the data file holds no label for the training
tickets, but configs/data/make_support_tickets.py knows every ticket's queue. That number is a diagnostic of
the filters for this study only; no stage reads it.
"""

import argparse
import importlib.util
import json
import logging
import platform
import time
from datetime import date
from pathlib import Path

from distilflow.configs.loader import load_config, parse_overrides
from distilflow.tasks.stages import run_stage

REPO = Path(__file__).resolve().parents[2]
CONFIG = REPO / "configs" / "recipe-study.yaml"
JUDGE_RUBRIC = ("The answer is the queue that should handle the ticket: payment for charges, refunds and invoices; "
                "delivery for parcels and shipping; bug for something that does not work; account for logins, "
                "profiles and personal data.")
# Every student trains the same number of steps, whatever a filter leaves: 40 per phase, one epoch of the
# unfiltered 320 answers at batch 8 (a filter that halves the data would otherwise also halve the training).
SAME_STEPS = {"distill.sft.max_steps": 40, "distill.logit_kd.max_steps": 40}
FILTERS = {
    "none": {},
    "confidence": {"prototype.min_confidence": 0.5, **SAME_STEPS},
    "confidence-per-label": {"prototype.keep_most_confident": 0.6, **SAME_STEPS},
    "agreement": {"prototype.num_samples": 8, "prototype.temperature": 1.0, "prototype.min_agreement": 0.5,
                  **SAME_STEPS},
    "judge": {"prototype.judge": {"rubric": JUDGE_RUBRIC, "threshold": 4}, **SAME_STEPS},
}


def true_queues() -> dict[str, str]:
    """Every ticket's queue by its text, from the generator of the data file."""
    spec = importlib.util.spec_from_file_location("tickets", REPO / "configs" / "data" / "make_support_tickets.py")
    tickets = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tickets)
    return {t["text"]: t["queue"] for t in tickets.make_tickets()}


def kept_precision(dataset_jsonl: Path, truth: dict[str, str], template_prefix: str = "Ticket: ") -> float:
    """Share of kept answers that name the ticket's true queue."""
    rows = [json.loads(line) for line in dataset_jsonl.read_text().splitlines()]
    right = [row["answer"] == truth[row["prompt"][-1]["content"].removeprefix(template_prefix)] for row in rows]
    return sum(right) / len(right)


def run_recipe(name: str, overrides: dict, truth: dict[str, str]) -> dict:
    cfg = load_config(CONFIG, overrides)
    start = time.perf_counter()
    prototype = run_stage("prototype", cfg)
    prototype_s = time.perf_counter() - start
    distill = run_stage("distill", cfg, prototype)
    distill_s = time.perf_counter() - start - prototype_s
    teacher = prototype.teacher_row
    return {"filter": name, "overrides": overrides, "kept": prototype.metrics["kept"],
            "rejected": {k.removeprefix("rejected."): v for k, v in prototype.metrics.items()
                         if k.startswith("rejected.")},
            "kept_precision": kept_precision(prototype.dataset_jsonl, truth),
            "teacher": {"task_score": teacher.task_score, "task_score_ci": teacher.task_score_ci},
            "phases": [{"phase": e.phase, "task_score": e.task_score, "task_score_ci": e.task_score_ci,
                        "perplexity": e.perplexity} for e in distill.journey],
            "seconds": {"prototype": prototype_s, "distill": distill_s,
                        "cached": {"prototype": prototype.cached, "distill": distill.cached}}}


def table(rows: list[dict]) -> str:
    phases = [p["phase"] for p in rows[0]["phases"]]
    lines = ["| filter | kept (of 320) | kept answers right | " + " | ".join(phases) + " |",
             "|---|---|---|" + "---|" * len(phases)]
    for row in rows:
        cells = [f"{p['task_score']:.3f} ({p['task_score_ci'][0]:.3f}–{p['task_score_ci'][1]:.3f})"
                 for p in row["phases"]]
        lines.append(f"| {row['filter']} | {row['kept']} | {row['kept_precision']:.3f} | {' | '.join(cells)} |")
    teacher = rows[0]["teacher"]
    lines.append(f"\nteacher: {teacher['task_score']:.3f} ({teacher['task_score_ci'][0]:.3f}–"
                 f"{teacher['task_score_ci'][1]:.3f})")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--workdir", type=Path, help="default: the study config's (runs/demo)")
    parser.add_argument("--only", nargs="*", choices=list(FILTERS), default=list(FILTERS))
    parser.add_argument("--set", action="append", default=[], help="more config overrides, key=value")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    common = {**({"run.workdir": str(args.workdir.resolve())} if args.workdir else {}), **parse_overrides(args.set)}
    truth = true_queues()
    rows = []
    for name in args.only:
        rows.append(run_recipe(name, {**common, **FILTERS[name]}, truth))
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({"date": str(date.today()), "machine": platform.platform(),
                                        "config": str(CONFIG.relative_to(REPO)), "common": common, "rows": rows},
                                       indent=1))
        print(table(rows), flush=True)


if __name__ == "__main__":
    main()
