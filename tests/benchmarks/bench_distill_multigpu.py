"""Distillation on several GPUs: tokens/s of one phase on 1 GPU, on N GPUs with DDP, and with FSDP.

Each run goes through the stage's own launch path (``distill.launch``: ``accelerate launch`` of
``python -m distilflow.tasks.distill``), with the same per-GPU batch, so N GPUs see N times the
data per step. Tokens/s comes from the trainer's own count (non-padding input tokens, summed over
GPUs). Writes multigpu.json:

    python -m tests.benchmarks.bench_distill_multigpu --out OUT --gpus 2            # 2 GPUs
    python -m tests.benchmarks.bench_distill_multigpu --out OUT --gpus 2 --cpu --student tiny --steps 4  # CPU smoke
"""

import argparse
import json
import time
from pathlib import Path

import torch

from distilflow.tasks import distill
from distilflow.tasks.tracking import FileTracker
from tests.benchmarks.distill_setup import (benchmark_config, context, logged, random_model, task_dataset,
                                             training_summary)


def run_layout(name: str, processes: int, fsdp: bool, args, student_dir: Path, dataset_dir: Path, dataset,
               work: Path) -> dict:
    cfg = benchmark_config({
        "run.device": "cpu" if args.cpu else "cuda", "distill.processes": processes, "distill.fsdp": fsdp,
        "distill.lora": {} if args.finetune == "lora" else None, "distill.sft": {
            "max_steps": args.steps, "per_device_train_batch_size": args.batch_size, "max_length": args.max_length,
            "save_steps": 10_000, "logging_steps": args.steps, "learning_rate": 1e-4}})
    records = work / f"{name}.jsonl"
    ctx = context(cfg, work / name, torch.device(cfg.run.device), FileTracker(records))
    ctx.checkpoint_dir.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    distill.launch("sft", student_dir, work / name / "model", dataset_dir, {}, cfg.distill, ctx)
    wall = time.perf_counter() - start
    final = training_summary(logged(records), "sft")
    return {"processes": processes, "fsdp": fsdp, "tokens_per_s": final["sft.train_tokens_per_second"],
            "train_s": final["sft.train_runtime"], "wall_s_with_launch_and_merge": wall}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--gpus", type=int, default=2)
    parser.add_argument("--student", default="qwen2.5-0.5b")
    parser.add_argument("--finetune", default="full", choices=["full", "lora"])
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--max-length", type=int, default=256)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--cpu", action="store_true", help="smoke test of the launch path with gloo")
    args = parser.parse_args()
    work = args.out
    work.mkdir(parents=True, exist_ok=True)
    dataset = task_dataset(benchmark_config({}), work / "dataset")
    student_dir = random_model(args.student, work / "student", seed=2)
    layouts = [("1-gpu", 1, False), (f"{args.gpus}-gpu-ddp", args.gpus, False),
               (f"{args.gpus}-gpu-fsdp", args.gpus, True)]
    runs = {name: run_layout(name, n, fsdp, args, student_dir, work / "dataset", dataset, work)
            for name, n, fsdp in layouts}
    single = runs["1-gpu"]["tokens_per_s"]
    result = {"date": time.strftime("%Y-%m-%d"), "device": "cpu" if args.cpu else torch.cuda.get_device_name(),
              "student": args.student, "finetune": args.finetune, "per_gpu_batch": args.batch_size,
              "steps": args.steps, "runs": runs,
              "scaling": {name: run["tokens_per_s"] / single for name, run in runs.items()}}
    (work / "multigpu.json").write_text(json.dumps(result, indent=1))
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
