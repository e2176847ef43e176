"""Logit KD from a teacher served by vLLM, end to end: the demo pipeline (`distilflow run configs/demo.yaml`)
with the embedded teacher behind vLLM's OpenAI server as the HTTP teacher (labels scored from its prompt
log-probs), a student cut from the teacher's 20 most influential layers and saved beside it (an HTTP
teacher has no weights to cut in the pipeline), and distill phases sft then logit_kd (offline, from the
server's top-64 prompt log-probs). Writes OUT/served_logit_kd.json: the journey, the run's wall time, the
teacher-logits cache's metrics and the prototype's data card line on how labels were chosen.

    python -m tests.benchmarks.bench_served_logit_kd --out $OUT/served-kd --vllm-pythonpath /tmp/site-vllm:/tmp/site
    python -m tests.benchmarks.bench_served_logit_kd --out OUT --test-server --device cpu --smoke   # CPU smoke
"""

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

from distilflow.tasks import prune
from distilflow.tasks.models import load_model, save_model
from tests.benchmarks.vllm_teacher import DEMO, embedded_teacher, free_port, vllm_server

TOP_K = 64
STUDENT_LAYERS = 20
# --smoke: the same run, small enough for a CPU (it proves the script, not the numbers).
SMOKE = {"task.max_train": 24, "task.eval_size": 8, "prototype.shot_candidates": 1, "distill.sft.max_steps": 2,
         "distill.logit_kd.max_steps": 2, "compress.quantize.method": "rtn", "deploy.gguf": "none",
         "deploy.smoke_prompts": 2, "eval.perplexity_examples": 4, "eval.speed_new_tokens": 4,
         "deploy.gate.min_retention": None}


def student_from(teacher_dir: Path, directory: Path, device: torch.device) -> Path:
    """The teacher's ``STUDENT_LAYERS`` most influential layers (block influence on the demo's tickets)."""
    if (directory / "config.json").is_file():
        return directory
    model, tokenizer = load_model(teacher_dir, device)
    texts = [json.loads(line)["text"] for line in (DEMO.parent / "data" / "support_tickets.jsonl").open()][:16]
    batches = [tokenizer(texts[i:i + 8], return_tensors="pt", padding=True).to(device) for i in range(0, 16, 8)]
    keep = prune.most_influential(prune.block_influence(model, batches), STUDENT_LAYERS)
    return save_model(prune.keep_layers(model, keep), tokenizer, directory)


def distilflow(*args: str, env: dict) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "distilflow.flows.cli", *args], env=env, capture_output=True,
                          text=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--vllm-pythonpath", help="PYTHONPATH of the vLLM server, e.g. /tmp/site-vllm:/tmp/site")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--test-server", action="store_true",
                        help="serve with tests/openai_server.py instead of vLLM (a CPU smoke of this script)")
    parser.add_argument("--smoke", action="store_true", help="a few training steps and tickets (CPU smoke)")
    args = parser.parse_args()
    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    teacher_dir = embedded_teacher(out / "teacher")
    student_dir = student_from(teacher_dir, out / "student", torch.device(args.device))
    if args.device == "cuda":
        torch.cuda.empty_cache()

    env = {**os.environ, "DISTILFLOW_HOME": str(out / "home"), "PREFECT_HOME": str(out / "prefect")}
    with vllm_server(teacher_dir, "teacher", free_port(), out / "server.log", max_logprobs=TOP_K,
                     pythonpath=args.vllm_pythonpath, test_server=args.test_server) as base_url:
        settings = {"run.workdir": str(out / "work"), "run.device": args.device,
                    "prototype.teacher": {"base_url": base_url, "model": "teacher", "tokenizer": str(teacher_dir),
                                          "max_concurrency": 32, "timeout_s": 600},
                    "distill.student": {"path": str(student_dir)}, "distill.phases": ["sft", "logit_kd"],
                    "distill.logit_kd.top_k": TOP_K, **(SMOKE if args.smoke else {})}
        assignments = [f"--set={key}={json.dumps(value)}" for key, value in settings.items()]
        start = time.perf_counter()
        run = distilflow("run", str(DEMO), *assignments, env=env)
        seconds = time.perf_counter() - start
    (out / "run.log").write_text(run.stdout + run.stderr)
    report = distilflow("report", "--latest", "--json", env=env)
    [cache] = list((out / "work" / "artifacts" / "teacher_logits").glob("*/result.json")) or [None]
    [card] = list((out / "work" / "artifacts" / "prototype").glob("*/data_card.md")) or [None]
    results = {"device": torch.cuda.get_device_name() if args.device == "cuda" else "cpu",
               "server": "tests/openai_server.py" if args.test_server else "vLLM", "smoke": args.smoke,
               "exit_code": run.returncode, "run_seconds": round(seconds, 1),
               "journey": json.loads(report.stdout)["journey"] if report.returncode == 0 else None,
               "teacher_logits": json.loads(cache.read_text())["metrics"] if cache else None,
               "labels": next((line for line in card.read_text().splitlines() if line.startswith("Labels chosen")),
                              None) if card else None}
    (out / "served_logit_kd.json").write_text(json.dumps(results, indent=1))
    print(json.dumps(results))
    sys.exit(run.returncode)


if __name__ == "__main__":
    main()
