"""The pipeline's stage functions called directly: no Prefect, no MLflow (tracking goes to the log).

The baseline that bench_cpu.py compares the orchestrated run against:
    python -m tests.benchmarks.stages_direct CONFIG.yaml --set run.workdir=DIR --out RESULT.json
"""

import argparse
import json
import logging
import time
from pathlib import Path

from distilflow.configs.loader import load_config, parse_overrides
from distilflow.tasks.stages import STAGES, run_stage


def run_direct(config: str, overrides: dict) -> dict:
    cfg = load_config(config, overrides)
    results, seconds = {}, {}
    for name, stage in STAGES.items():
        start = time.perf_counter()
        results[name] = run_stage(name, cfg, {n: results[n] for n in stage.needs})
        seconds[name] = time.perf_counter() - start
    return {"bundle": str(results["deploy"].path("bundle")), "stage_seconds": seconds,
            "journey": [e for r in results.values() for e in r.journey if r.stage != "deploy"]
            + results["deploy"].journey}


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("config")
    parser.add_argument("--set", action="append", default=[])
    parser.add_argument("--out", type=Path, required=True, help="the result (JSON); stdout carries the trainers' logs")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    args.out.write_text(json.dumps(run_direct(args.config, parse_overrides(args.set))))
