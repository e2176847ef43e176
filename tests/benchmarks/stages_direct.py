"""The pipeline's stage functions called directly: no Prefect, no MLflow (tracking goes to the log).

The baseline that bench_cpu.py compares the orchestrated run against:
    python -m tests.benchmarks.stages_direct CONFIG.yaml --set run.workdir=DIR
"""

import argparse
import json
import logging

from distilflow.configs.loader import load_config, parse_overrides
from distilflow.tasks.stages import STAGES, run_stage


def run_direct(config: str, overrides: dict) -> dict:
    cfg = load_config(config, overrides)
    results = {}
    for name, stage in STAGES.items():
        results[name] = run_stage(name, cfg, {n: results[n] for n in stage.needs})
    return {"bundle": str(results["deploy"].path("bundle")),
            "journey": [e for r in results.values() for e in r.journey if r.stage != "deploy"]
            + results["deploy"].journey}


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("config")
    parser.add_argument("--set", action="append", default=[])
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    print(json.dumps(run_direct(args.config, parse_overrides(args.set))))
