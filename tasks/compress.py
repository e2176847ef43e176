"""Stage 3, compress: quantize the student (W4A16), reload the checkpoint from disk, evaluate it."""

import json

import torch
from datasets import load_from_disk

from distilflow.configs.schema import CompressConfig
from distilflow.tasks import quantize
from distilflow.tasks.artifacts import StageResult
from distilflow.tasks.context import StageContext
from distilflow.tasks.evaluate import evaluate_saved
from distilflow.tasks.models import load_model


def run(cfg: CompressConfig, upstream: dict[str, StageResult], ctx: StageContext) -> StageResult:
    out = ctx.out_dir
    # Quantize from bf16 weights: fp32 would leave the unquantized embeddings twice as large.
    student, tokenizer = load_model(upstream["distill"].path("student"), ctx.device, dtype=torch.bfloat16)
    calibration = calibration_texts(tokenizer, upstream["prototype"].path("dataset"), cfg.quantize.calibration_samples)
    done = quantize.quantize(student, tokenizer, cfg.quantize, calibration, out / "quantized")
    ctx.tracker.log_params({f"quantize.{k}": v for k, v in done.items()})

    result = evaluate_saved(out / "quantized", ctx.examples.eval, ctx.task, ctx.eval, ctx.device,
                            desc="quantized eval")
    (out / "quantized_eval.json").write_text(json.dumps(result.report(), indent=1))
    metrics = {f"quantized.{k}": v for k, v in result.metrics.items()}
    ctx.tracker.log_metrics(metrics)
    ctx.tracker.log_artifact(out / "quantized_eval.json")
    scheme = f"{cfg.quantize.scheme} {cfg.quantize.method}, group size {done['group_size']}"
    return StageResult(stage="compress", files={"model": "quantized"}, metrics=metrics,
                       journey=[{**result.journey_entry("quantized"), "scheme": scheme}],
                       summary=f"Quantized {scheme}; task score {result.metrics['task_score']:.3f}\n")


def calibration_texts(tokenizer, dataset_dir, samples: int) -> list[str]:
    """Calibration from the task's own prompts and answers, in the chat format the model serves."""
    dataset = load_from_disk(dataset_dir, keep_in_memory=True)
    rows = dataset.shuffle(seed=0).select(range(min(samples, len(dataset))))
    return [tokenizer.apply_chat_template(r["prompt"] + r["completion"], tokenize=False) for r in rows]
