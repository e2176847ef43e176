"""Logit KD throughput: offline top-k teacher log-probs against the online teacher, in one run.

Same GPU, same models, data, batch size, sequence length and steps; both through distilflow's own
``distill.logit_kd``. Offline pays the teacher once (its cache build is reported apart); online runs
the teacher beside the student at every step. A few online steps first warm the GPU up, so neither
timed run pays for CUDA's first kernels. ``--context-tickets N`` puts N tickets in each prompt (long
prompt, one-word answer). Prints JSON (tokens/s, peak memory, loss curves) and
writes kd_throughput.json, plus kd_throughput.png where matplotlib is installed:

    python -m tests.benchmarks.bench_kd_throughput --out OUT            # GPU: 1.7B-shaped teacher, 360M student
    python -m tests.benchmarks.bench_kd_throughput --out OUT --context-tickets 12 --max-length 1024  # long prompts
    python -m tests.benchmarks.bench_kd_throughput --plot OUT/kd_throughput.json   # the PNG, anywhere
    python -m tests.benchmarks.bench_kd_throughput --out OUT --teacher tiny --student tiny --steps 4  # CPU smoke
"""

import argparse
import json
import time
from pathlib import Path

import torch

from distilflow.tasks import distill, teacher_logits
from distilflow.tasks.models import load_model, resolve_device
from distilflow.tasks.tracking import FileTracker
from tests.benchmarks.distill_setup import (benchmark_config, context, logged, random_model, task_dataset,
                                             training_summary)
from tests.benchmarks.figures import draw_if_possible, pyplot, save_beside


def run_mode(mode: str, cfg, dataset, teacher_dir: Path, student_dir: Path, work: Path, device) -> dict:
    records = work / f"{mode}.jsonl"
    ctx = context(cfg, work / mode, device, FileTracker(records))
    student, tokenizer = load_model(student_dir, device)
    sources, cache_seconds = {}, None
    if mode == "offline":
        examples = teacher_logits.tokenize(tokenizer, dataset, cfg.distill.logit_kd.max_length)
        start = time.perf_counter()
        cache = teacher_logits.cached(teacher_dir, examples, cfg.distill.logit_kd.top_k,
                                      cfg.distill.logit_kd.temperature, work,
                                      load_teacher=lambda: load_model(teacher_dir, device)[0])
        cache_seconds = time.perf_counter() - start
        sources["logits_file"] = cache.logits
    else:
        sources["teacher"] = load_model(teacher_dir, device)[0]
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    distill.logit_kd(student, tokenizer, dataset, cfg.distill, ctx, **sources)
    entries = logged(records)
    final = training_summary(entries, "logit_kd")
    curve = [(r["step"], r["metrics"]["logit_kd.loss"]) for r in entries if "logit_kd.loss" in r["metrics"]]
    return {"tokens_per_s": final["logit_kd.train_tokens_per_second"], "train_s": final["logit_kd.train_runtime"],
            "steps": curve[-1][0], "teacher_cache_s": cache_seconds,
            "peak_gpu_memory_gb": torch.cuda.max_memory_allocated() / 1e9 if device.type == "cuda" else None,
            "loss_curve": curve}


def plot(result_file: Path) -> Path:
    plt = pyplot()
    result = json.loads(result_file.read_text())
    figure, axes = plt.subplots(1, 2, figsize=(10, 4), sharey=True)
    for axis, mode in zip(axes, ("offline", "online")):
        steps, losses = zip(*result[mode]["loss_curve"])
        axis.plot(steps, losses)
        axis.set_title(f"{mode}: {result[mode]['tokens_per_s']:.0f} tokens/s")
        axis.set_xlabel("step")
    axes[0].set_ylabel(f"logit KD loss ({result['settings']['divergence']})")
    figure.suptitle(f"{result['teacher']} -> {result['student']} on {result['device']}")
    return save_beside(figure, result_file)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path)
    parser.add_argument("--plot", type=Path, help="only draw the PNG of an earlier result file")
    parser.add_argument("--teacher", default="smollm2-1.7b")
    parser.add_argument("--student", default="smollm2-360m")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--max-length", type=int, default=256)
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--top-k", type=int, default=64)
    parser.add_argument("--context-tickets", type=int, default=1, help="tickets per prompt")
    args = parser.parse_args()
    if args.plot:
        print(plot(args.plot))
        return
    work = args.out
    work.mkdir(parents=True, exist_ok=True)
    cfg = benchmark_config({"run.device": "auto", "distill.logit_kd": {
        "max_steps": args.steps, "per_device_train_batch_size": args.batch_size, "max_length": args.max_length,
        "top_k": args.top_k, "save_steps": 10_000, "logging_steps": 1, "learning_rate": 1e-4}})
    device = resolve_device("auto")
    dataset = task_dataset(cfg, work / "dataset", args.context_tickets)
    teacher_dir = random_model(args.teacher, work / "teacher", seed=1)
    student_dir = random_model(args.student, work / "student", seed=2)
    result = {"date": time.strftime("%Y-%m-%d"), "device": torch.cuda.get_device_name() if device.type == "cuda"
              else "cpu", "teacher": args.teacher, "student": args.student, "examples": len(dataset),
              "context_tickets": args.context_tickets,
              "settings": {**cfg.distill.logit_kd.model_dump(), "lora": cfg.distill.lora.model_dump()}}
    warm_up = cfg.model_copy(update={"distill": cfg.distill.model_copy(update={
        "logit_kd": cfg.distill.logit_kd.model_copy(update={"max_steps": 3})})})
    run_mode("online", warm_up, dataset, teacher_dir, student_dir, work / "warm-up", device)
    for mode in ("offline", "online"):
        result[mode] = run_mode(mode, cfg, dataset, teacher_dir, student_dir, work, device)
    result["offline_speedup"] = result["offline"]["tokens_per_s"] / result["online"]["tokens_per_s"]
    out = work / "kd_throughput.json"
    out.write_text(json.dumps(result, indent=1))
    print(json.dumps({k: v for k, v in result.items() if k not in ("offline", "online")} | {
        mode: {k: v for k, v in result[mode].items() if k != "loss_curve"} for mode in ("offline", "online")},
        indent=1))
    draw_if_possible(plot, out, __spec__.name)


if __name__ == "__main__":
    main()
