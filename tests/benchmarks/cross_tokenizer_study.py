"""The cross-tokenizer study (configs/cross-tokenizer-study.yaml): Gemma 3 270M teaches the SmolLM2-derived
student, once per variant of the knowledge-transfer recipe; prototype runs once and is shared.

    python -m tests.benchmarks.cross_tokenizer_study [--variants uld-few-shot uld] --out RESULT.json

Stages are called directly (no Prefect, no MLflow; tracking goes to the log), as stages_direct.py does.
Each variant prints its journey rows; the JSON holds them all, for docs/results/cross-tokenizer.md.
"""

import argparse
import json
import logging
import time
from pathlib import Path

from distilflow.configs.loader import load_config
from distilflow.tasks import journey
from distilflow.tasks.stages import run_stage

CONFIG = Path(__file__).resolve().parents[2] / "configs" / "cross-tokenizer-study.yaml"

# What each variant sets on top of the config (its own distill cache key, so each trains from the start; the
# sft phase is the same in each, and its journey row is the study's SFT-only row).
VARIANTS = {
    "uld-few-shot": {"distill.logit_kd.uld_teacher_prompt": "few_shot"},
    "uld": {"distill.logit_kd.uld_teacher_prompt": "student"},
}
# GOLD's byte alignment (use_extended_uld) is not a variant here: TRL takes byte offsets from ByteLevel BPE
# tokenizers only, and Gemma's is SentencePiece (distill refuses it before training, naming the key).


def run_study(variants: list[str], overrides: dict) -> dict:
    cfg = load_config(CONFIG, overrides)
    start = time.perf_counter()
    prototype = run_stage("prototype", cfg)
    results = {"prototype": {"journey": [prototype.teacher_row.as_json()], "metrics": prototype.metrics,
                             "seconds": time.perf_counter() - start}}
    for name in variants:
        start = time.perf_counter()
        distill = run_stage("distill", load_config(CONFIG, {**overrides, **VARIANTS[name]}), prototype)
        results[name] = {"journey": journey.to_json(distill.journey), "metrics": distill.metrics,
                         "seconds": time.perf_counter() - start}
        print(json.dumps({name: results[name]}, indent=1), flush=True)
    return results


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--variants", nargs="*", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--workdir", help="run.workdir (default: the config's)")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO)
    overrides = {"run.workdir": args.workdir} if args.workdir else {}
    args.out.write_text(json.dumps(run_study(args.variants, overrides), indent=1))
