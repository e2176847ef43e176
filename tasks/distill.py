"""Stage 2, distill: make the student and train it on the teacher's kept answers (LoRA SFT with TRL)."""

import json
import logging
from pathlib import Path

import peft
from datasets import Dataset, load_from_disk
from transformers.trainer_utils import get_last_checkpoint
from trl import SFTConfig, SFTTrainer

from distilflow.configs.schema import DistillConfig, StudentConfig
from distilflow.tasks import prune
from distilflow.tasks.artifacts import StageResult
from distilflow.tasks.context import StageContext
from distilflow.tasks.errors import DistilflowError
from distilflow.tasks.evaluate import evaluate_saved
from distilflow.tasks.models import load_model, save_model
from distilflow.tasks.tracking import TrackerCallback

log = logging.getLogger("distilflow")

INFLUENCE_SAMPLES = 16


def run(cfg: DistillConfig, upstream: dict[str, StageResult], ctx: StageContext) -> StageResult:
    prototype, out = upstream["prototype"], ctx.out_dir
    # In memory: datasets would otherwise write its map caches into the upstream artifact.
    dataset = load_from_disk(prototype.path("dataset"), keep_in_memory=True)
    teacher_dir = prototype.path("teacher") if "teacher" in prototype.files else None  # None: black-box teacher
    student, tokenizer, origin = make_student(cfg.student, teacher_dir, dataset, ctx)
    ctx.tracker.log_params({"student.origin": origin})

    trained = sft(student, tokenizer, dataset, cfg, ctx)
    save_model(trained, tokenizer, out / "student")

    result = evaluate_saved(out / "student", ctx.examples.eval, ctx.task, ctx.eval, ctx.device, desc="student eval")
    (out / "student_eval.json").write_text(json.dumps(result.report(), indent=1))
    metrics = {f"student.{k}": v for k, v in result.metrics.items()}
    ctx.tracker.log_metrics(metrics)
    ctx.tracker.log_artifact(out / "student_eval.json")
    return StageResult(stage="distill", files={"student": "student"}, metrics=metrics,
                       journey=[result.journey_entry("student")],
                       summary=f"Student: {origin}; task score {result.metrics['task_score']:.3f}\n")


def make_student(cfg: StudentConfig, teacher_dir: Path | None, dataset: Dataset, ctx: StageContext):
    """The student as (model, tokenizer, how it was made): a given model, or layers kept from the teacher."""
    if cfg.path:
        model, tokenizer = load_model(Path(cfg.path), ctx.device)
        return model, tokenizer, cfg.path
    if teacher_dir is None:
        raise DistilflowError("distill.student.teacher_layers keeps layers of the teacher's weights, but the "
                              "teacher is black-box (prototype.teacher.base_url): set distill.student.path to a "
                              "smaller model instead")
    teacher, tokenizer = load_model(teacher_dir, ctx.device)
    influence = prune.block_influence(teacher, _batches(tokenizer, dataset, ctx))
    keep = prune.most_influential(influence, cfg.teacher_layers)
    ctx.tracker.log_metrics({f"block_influence.layer_{i:02d}": v for i, v in enumerate(influence)})
    log.info("student keeps teacher layers %s", keep)
    return prune.keep_layers(teacher, keep), tokenizer, f"teacher layers {keep}"


def _batches(tokenizer, dataset: Dataset, ctx: StageContext, batch_size: int = 8) -> list[dict]:
    rows = dataset.select(range(min(INFLUENCE_SAMPLES, len(dataset))))
    texts = [tokenizer.apply_chat_template(r["prompt"] + r["completion"], tokenize=False) for r in rows]
    tokenizer.padding_side = "right"
    return [tokenizer(texts[i:i + batch_size], return_tensors="pt", padding=True).to(ctx.device)
            for i in range(0, len(texts), batch_size)]


def sft(student, tokenizer, dataset: Dataset, cfg: DistillConfig, ctx: StageContext):
    """LoRA SFT on the kept teacher answers (loss on the answers only); returns the merged model.

    Checkpoints go to ``ctx.checkpoint_dir``, so a killed run resumes where it stopped.
    """
    args = SFTConfig(
        output_dir=str(ctx.checkpoint_dir), num_train_epochs=cfg.sft.epochs, max_steps=cfg.sft.max_steps,
        per_device_train_batch_size=cfg.sft.batch_size,
        gradient_accumulation_steps=cfg.sft.gradient_accumulation_steps,
        learning_rate=cfg.sft.learning_rate, max_length=cfg.sft.max_length, seed=ctx.seed,
        logging_steps=cfg.sft.logging_steps, save_steps=cfg.sft.save_steps, save_total_limit=2, report_to="none",
        use_cpu=ctx.device.type == "cpu", bf16=ctx.device.type == "cuda", gradient_checkpointing=False,
    )
    lora = peft.LoraConfig(r=cfg.lora.r, lora_alpha=cfg.lora.alpha, lora_dropout=cfg.lora.dropout,
                           target_modules=cfg.lora.target_modules, task_type="CAUSAL_LM")
    trainer = SFTTrainer(model=student, args=args, train_dataset=dataset.select_columns(["prompt", "completion"]),
                         processing_class=tokenizer, peft_config=lora,
                         callbacks=[TrackerCallback(ctx.tracker, "sft")])
    resume = get_last_checkpoint(str(ctx.checkpoint_dir)) if ctx.checkpoint_dir.is_dir() else None
    if resume:
        log.info("resuming SFT from %s", resume)
    trainer.train(resume_from_checkpoint=resume)
    return trainer.model.merge_and_unload()
