"""The pipeline's stage functions called directly: no Prefect, no MLflow (tracking goes to the log).

The baseline that bench_cpu.py compares the orchestrated run against:
    python -m tests.benchmarks.stages_direct CONFIG.yaml --set run.workdir=DIR --out RESULT.json
With ``--until prototype`` only the first stage runs (a teacher lever measured without training a student).
"""

import argparse
import json
import logging
import time
from pathlib import Path

from distilflow.configs.loader import load_config, parse_overrides
from distilflow.tasks import journey
from distilflow.tasks.stages import run_stage


def run_direct(config: str, overrides: dict, until: str = "deploy") -> dict:
    cfg = load_config(config, overrides)
    seconds = {}

    def timed(name: str, *upstream):
        start = time.perf_counter()
        output = run_stage(name, cfg, *upstream)
        seconds[name] = time.perf_counter() - start
        return output

    prototype = timed("prototype")
    if until == "prototype":
        return {"stage_seconds": seconds, "journey": journey.to_json(prototype.journey),
                "data_card": prototype.data_card.read_text(), "metrics": prototype.metrics}
    distill = timed("distill", prototype)
    if until == "distill":
        return {"stage_seconds": seconds, "journey": journey.to_json([*prototype.journey, *distill.journey])}
    compress = timed("compress", prototype, distill)
    if until == "compress":
        return {"stage_seconds": seconds, "journey": journey.to_json([*prototype.journey, *distill.journey,
                                                                       *compress.journey])}
    deploy = timed("deploy", prototype, distill, compress)
    return {"bundle": str(deploy.bundle), "stage_seconds": seconds, "journey": journey.to_json(deploy.journey)}


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("config")
    parser.add_argument("--set", action="append", default=[])
    parser.add_argument("--out", type=Path, required=True, help="the result (JSON); stdout carries the trainers' logs")
    parser.add_argument("--until", choices=("prototype", "distill", "compress", "deploy"), default="deploy", help="the last stage to run")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    args.out.write_text(json.dumps(run_direct(args.config, parse_overrides(args.set), args.until)))
