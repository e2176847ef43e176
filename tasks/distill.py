"""Stage 2, distill: make the student, then train it in the configured phases, in order.

- ``sft``: the teacher's kept answers (sequence-level KD / rejection-sampling fine-tuning), TRL SFT;
- ``logit_kd``: the teacher's next-token distribution (tasks/kd.py), offline from cached top-k
  log-probs or online beside the teacher;
- ``grpo``: RL on the task's own check, TRL GRPO, optionally rewarding agreement with the teacher.

Each phase starts from the previous phase's model, trains LoRA adapters (merged afterwards; QLoRA
on a 4-bit base) or every weight, checkpoints into its own directory and is evaluated by the shared
evaluator. A finished phase's model is kept until the stage publishes, so a killed run resumes at
the phase (and the checkpoint) where it stopped. With ``distill.processes > 1`` each phase runs on
several GPUs: ``accelerate launch ... -m distilflow.tasks.distill REQUEST.json`` (DDP, or FSDP).

The phase functions (``sft``, ``logit_kd``, ``grpo``) take the student in memory and return it
trained and merged; they read their own settings and ``lora`` from ``cfg``, so other stages call
them too (compress heals pruned models with them).
"""

import json
import logging
import os
import shutil
import subprocess
import sys
from dataclasses import asdict, replace
from pathlib import Path

import peft
import torch
from accelerate import PartialState
from datasets import Dataset, load_from_disk
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig, TrainingArguments, set_seed
from trl import GRPOConfig, GRPOTrainer, SFTConfig, SFTTrainer
from trl.experimental.gkd import GKDConfig

from distilflow.configs.schema import (DistillConfig, EvalConfig, LoraConfig, ModelTrust, StudentConfig, TaskConfig,
                                      TrainingConfig)
from distilflow.tasks import checks, decoding, kd, prune, teacher_logits
from distilflow.tasks.artifacts import StageResult
from distilflow.tasks.context import StageContext
from distilflow.tasks.data import TaskData
from distilflow.tasks.errors import DistilflowError
from distilflow.tasks.evaluate import Evaluation, evaluate_saved
from distilflow.tasks.models import (compute_dtype, explained_load_errors, load_model, loading_safeguards, save_model,
                                    trust_summary)
from distilflow.tasks.tracking import FileTracker, TrackerCallback

log = logging.getLogger("distilflow")

INFLUENCE_SAMPLES = 16
# Token counts in the training logs give tokens/s per phase (GRPO logs its own num_tokens).
COUNT_TOKENS = {"include_num_input_tokens_seen": "non_padding"}


def run(cfg: DistillConfig, upstream: dict[str, StageResult], ctx: StageContext) -> StageResult:
    prototype, out = upstream["prototype"], ctx.out_dir
    teacher_dir = prototype.path("teacher") if "teacher" in prototype.files else None
    check_can_train(cfg, teacher_dir, ctx.device)
    # In memory: datasets would otherwise write its map caches into the upstream artifact.
    dataset = load_from_disk(prototype.path("dataset"), keep_in_memory=True)
    model_dir, origin = initial_student(cfg.student, teacher_dir, dataset, ctx)
    if "logit_kd" in cfg.phases and cfg.logit_kd.teacher_logits != "choices":
        teacher_logits.require_shared_vocabulary(teacher_dir, model_dir)
    ctx.tracker.log_params({"student.origin": origin, "student.allow_pickle": cfg.student.allow_pickle,
                            "student.trust_remote_code": cfg.student.trust_remote_code,
                            "effective.device": ctx.device.type,
                            "effective.dtype": str(compute_dtype(ctx.device)).removeprefix("torch.")})

    journey, metrics = [], {}
    for phase in cfg.phases:
        with ctx.tracker.child(phase) as tracker:
            tracker.set_tags({"distilflow.stage": "distill", "distilflow.phase": phase})
            phase_ctx = replace(ctx, checkpoint_dir=ctx.checkpoint_dir / phase, tracker=tracker)
            model_dir = trained(phase, model_dir, prototype.path("dataset"), dataset, teacher_dir, cfg, phase_ctx)
            evaluation = evaluated(model_dir, phase_ctx, desc=f"student eval ({phase})")
            tracker.log_metrics({f"student.{k}": v for k, v in evaluation.metrics.items()})
        (out / f"student_eval_{phase}.json").write_text(json.dumps(evaluation.report(), indent=1))
        ctx.tracker.log_artifact(out / f"student_eval_{phase}.json")
        metrics.update({f"{phase}.{k}": v for k, v in evaluation.metrics.items()})
        journey.append({**evaluation.journey_entry("student"), "phase": phase})

    shutil.copytree(model_dir, out / "student")
    metrics.update({f"student.{k}": v for k, v in evaluation.metrics.items()})
    ctx.tracker.log_metrics(metrics)
    scores = ", ".join(f"{e['phase']} {e['task_score']:.3f}" for e in journey)
    return StageResult(stage="distill", files={"student": "student"}, metrics=metrics, journey=journey,
                       summary=f"Student: {origin}; task score after {scores}\n")


def check_can_train(cfg: DistillConfig, teacher_dir: Path | None, device: torch.device) -> None:
    """Fail before any training on what no phase could do."""
    if cfg.qlora and device.type != "cuda":
        raise DistilflowError(f"distill.qlora trains on a 4-bit base through bitsandbytes, which needs a GPU; "
                              f"this run's device is {device.type}. Set distill.qlora: false")
    if cfg.processes > 1 and device.type == "cuda" and cfg.processes > torch.cuda.device_count():
        raise DistilflowError(f"distill.processes is {cfg.processes} but only {torch.cuda.device_count()} GPUs "
                              "are visible")
    if teacher_dir is None and cfg.student.teacher_layers:
        raise DistilflowError("distill.student.teacher_layers derives the student from the teacher's weights, but "
                              "the teacher is a black box (an HTTP endpoint); set distill.student.path instead")
    if teacher_dir is None and "logit_kd" in cfg.phases:
        raise DistilflowError("distill.phases has logit_kd, which needs the teacher's token distributions, but the "
                              "teacher is a black box (an HTTP endpoint) that gives answers only; use sft and grpo")


def require_choice_probabilities(dataset: Dataset) -> None:
    """``logit_kd.teacher_logits: choices`` learns the label probabilities prototype recorded per answer."""
    if "choice_probs" not in dataset.column_names:
        raise DistilflowError("distill.logit_kd.teacher_logits is choices, but the distillation set has no "
                              "choice_probs (the teacher's probability of each label): they are recorded for a "
                              "choice task on a white-box teacher; use teacher_logits: offline")


def initial_student(cfg: StudentConfig, teacher_dir: Path | None, dataset: Dataset,
                    ctx: StageContext) -> tuple[str | Path, str]:
    """Where the student starts, and how it was made: a given model, or the teacher's most influential
    layers (kept under the checkpoint dir, so a resumed run does not derive it again)."""
    if cfg.path:
        loading_safeguards(cfg.path, cfg, "distill.student")  # refuse a pickle-only student before any work
        log.info("student %s (%s)", cfg.path, trust_summary(cfg))
        return cfg.path, cfg.path
    directory = ctx.checkpoint_dir / "student-init"
    origin_file = ctx.checkpoint_dir / "student-init.json"
    if not origin_file.is_file():
        teacher, tokenizer = load_model(teacher_dir, ctx.device)
        influence = prune.block_influence(teacher, _batches(tokenizer, dataset, ctx))
        keep = prune.most_influential(influence, cfg.teacher_layers)
        ctx.tracker.log_metrics({f"block_influence.layer_{i:02d}": v for i, v in enumerate(influence)})
        log.info("student keeps teacher layers %s", keep)
        _save_atomically(prune.keep_layers(teacher, keep), tokenizer, directory)
        origin_file.write_text(json.dumps(f"teacher layers {keep}"))
    return directory, json.loads(origin_file.read_text())


def _batches(tokenizer, dataset: Dataset, ctx: StageContext, batch_size: int = 8) -> list[dict]:
    rows = dataset.select(range(min(INFLUENCE_SAMPLES, len(dataset))))
    texts = [tokenizer.apply_chat_template(r["prompt"] + r["completion"], tokenize=False) for r in rows]
    tokenizer.padding_side = "right"
    return [tokenizer(texts[i:i + batch_size], return_tensors="pt", padding=True).to(ctx.device)
            for i in range(0, len(texts), batch_size)]


def trained(phase: str, start: str | Path, dataset_dir: Path, dataset: Dataset, teacher_dir: Path | None,
            cfg: DistillConfig, ctx: StageContext) -> Path:
    """The student after ``phase``, trained from ``start`` now, or found finished by an earlier run."""
    done = ctx.checkpoint_dir / "model"
    if (done / "config.json").is_file():
        log.info("%s: reusing the finished phase's model %s", phase, done)
        return done
    ctx.checkpoint_dir.mkdir(parents=True, exist_ok=True)
    sources = teacher_sources(phase, start, dataset, teacher_dir, cfg, ctx)
    partial = ctx.checkpoint_dir / "model.partial"
    shutil.rmtree(partial, ignore_errors=True)
    if cfg.processes > 1 or (ctx.device.type == "cuda" and torch.cuda.device_count() > cfg.processes):
        launch(phase, start, partial, dataset_dir, sources, cfg, ctx)
    else:
        train_phase(phase, start, partial, dataset, sources, cfg, ctx)
    os.rename(partial, done)
    return done


def teacher_sources(phase: str, start: str | Path, dataset: Dataset, teacher_dir: Path | None,
                    cfg: DistillConfig, ctx: StageContext) -> dict[str, str]:
    """What the phase learns from besides the dataset, as paths: for logit KD, the teacher's directory
    (online) or its cached top-k log-probs (offline, computed here once per teacher and data)."""
    if phase != "logit_kd":
        return {}
    if cfg.logit_kd.teacher_logits == "online":
        return {"teacher": str(teacher_dir)}
    tokenizer = AutoTokenizer.from_pretrained(start)
    examples = teacher_logits.tokenize(tokenizer, dataset, cfg.logit_kd.max_length)
    if cfg.logit_kd.teacher_logits == "choices":  # no teacher run: the soft labels are in the dataset
        require_choice_probabilities(dataset)
        targets = ctx.checkpoint_dir / teacher_logits.FILE
        save_file(teacher_logits.from_choices(tokenizer, dataset, examples, cfg.logit_kd.top_k,
                                              cfg.logit_kd.temperature), targets)
        return {"logits_file": str(targets)}
    cache = teacher_logits.cached(teacher_dir, examples, cfg.logit_kd.top_k, cfg.logit_kd.temperature,
                                  ctx.workdir, load_teacher=lambda: load_model(teacher_dir, ctx.device)[0])
    ctx.tracker.log_metrics(cache.metrics)
    ctx.tracker.set_tags({"distilflow.teacher_logits": str(cache.directory)})
    return {"logits_file": str(cache.path("logits"))}


def train_phase(phase: str, start: str | Path, out_dir: Path, dataset: Dataset, sources: dict[str, str],
                cfg: DistillConfig, ctx: StageContext) -> None:
    """Load the student from ``start``, train ``phase`` and save the merged result to ``out_dir``."""
    set_seed(ctx.seed)
    student, tokenizer = load_student(start, cfg.qlora, ctx.device, cfg.student)
    teacher_inputs = {"teacher": load_model(Path(sources["teacher"]), ctx.device)[0]} if "teacher" in sources else \
        {name: Path(path) for name, path in sources.items()}
    trained_model = PHASES[phase](student, tokenizer, dataset, cfg, ctx, **teacher_inputs)
    if PartialState().is_main_process:
        save_model(trained_model, tokenizer, out_dir)


def load_student(path: str | Path, qlora: bool, device: torch.device, trust: ModelTrust = ModelTrust()):
    """The student to train: in the device's compute dtype, or 4-bit (NF4) for QLoRA. ``trust`` is
    distill.student's: what its files may run (a phase after the first starts from our own safetensors)."""
    if not qlora:
        return load_model(path, device, trust=trust, key="distill.student")
    quantization = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                      bnb_4bit_compute_dtype=compute_dtype(device))
    with explained_load_errors(path, None, "distill.student"):
        model = AutoModelForCausalLM.from_pretrained(path, quantization_config=quantization,
                                                     dtype=compute_dtype(device), device_map={"": device.index or 0},
                                                     **loading_safeguards(path, trust, "distill.student"))
        tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust.trust_remote_code)
    return peft.prepare_model_for_kbit_training(model, use_gradient_checkpointing=False), tokenizer


def with_adapters(student, lora: LoraConfig | None):
    """LoRA adapters on the student (QLoRA: on its 4-bit base), or the student itself for full fine-tuning."""
    if lora is None:
        return student
    return peft.get_peft_model(student, peft.LoraConfig(
        r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout, target_modules=lora.target_modules,
        task_type="CAUSAL_LM"))


def training_args(args_class, phase: TrainingConfig, ctx: StageContext, **extra):
    """One phase's trainer arguments: its schedule, checkpoints in its own dir, the device's precision.

    Several GPUs (DDP, FSDP) come from the launcher's environment (``accelerate launch``), not from here.
    """
    return args_class(
        output_dir=str(ctx.checkpoint_dir), num_train_epochs=phase.epochs, max_steps=phase.max_steps,
        per_device_train_batch_size=phase.batch_size, gradient_accumulation_steps=phase.gradient_accumulation_steps,
        learning_rate=phase.learning_rate, seed=ctx.seed, logging_steps=phase.logging_steps,
        save_steps=phase.save_steps, save_total_limit=2, report_to="none", use_cpu=ctx.device.type == "cpu",
        bf16=ctx.device.type == "cuda", gradient_checkpointing=False, **extra)


def train(trainer, ctx: StageContext) -> None:
    """Log the effective settings, then train, resuming from the phase's last checkpoint if there is one."""
    if trainer.is_world_process_zero():
        parameters = list(trainer.model.parameters())
        # Metrics, not params: a caller may train several times in one run (compress heals each candidate).
        ctx.tracker.log_metrics({
            "effective.world_size": trainer.args.world_size, "effective.bf16": int(trainer.args.bf16),
            "effective.trainable_params": sum(p.numel() for p in parameters if p.requires_grad),
            "effective.total_params": sum(p.numel() for p in parameters)})
        args_file = ctx.checkpoint_dir / "effective_training_args.json"
        args_file.write_text(trainer.args.to_json_string())
        ctx.tracker.log_artifact(args_file)
    resume = last_checkpoint(ctx.checkpoint_dir)
    if resume:
        log.info("resuming from %s", resume)
    trainer.train(resume_from_checkpoint=resume)


def last_checkpoint(directory: Path) -> str | None:
    """The newest checkpoint the trainer finished writing: one killed mid-save lacks its trainer_state.json."""
    complete = [p for p in directory.glob("checkpoint-*") if (p / "trainer_state.json").is_file()]
    return str(max(complete, key=lambda p: int(p.name.rsplit("-", 1)[1]))) if complete else None


def merged(trainer, lora: LoraConfig | None):
    """The trained student as a plain model: adapters merged into the weights.

    A 4-bit (QLoRA) or sharded (FSDP) base cannot take the adapters in place: the trainer saves
    them, and they are merged into the base reloaded in full precision.
    """
    model = trainer.model
    quantized = lora is not None and getattr(model.get_base_model(), "is_loaded_in_4bit", False)
    if not (quantized or trainer.is_fsdp_enabled):
        return model.merge_and_unload() if lora else model
    saved = Path(trainer.args.output_dir) / "final"
    trainer.save_model(str(saved))
    trainer.accelerator.wait_for_everyone()
    device = trainer.args.device
    if lora is None:
        return AutoModelForCausalLM.from_pretrained(saved, dtype=compute_dtype(device)).to(device)
    base = AutoModelForCausalLM.from_pretrained(model.peft_config["default"].base_model_name_or_path,
                                                dtype=compute_dtype(device))
    return peft.PeftModel.from_pretrained(base, saved).merge_and_unload().to(device)


def sft(student, tokenizer, dataset: Dataset, cfg: DistillConfig, ctx: StageContext):
    """Fine-tune on the kept teacher answers (loss on the answers only); returns the merged model.

    Checkpoints go to ``ctx.checkpoint_dir``, so a killed run resumes where it stopped.
    """
    args = training_args(SFTConfig, cfg.sft, ctx, max_length=cfg.sft.max_length, **COUNT_TOKENS)
    trainer = SFTTrainer(model=with_adapters(student, cfg.lora), args=args, processing_class=tokenizer,
                         train_dataset=dataset.select_columns(["prompt", "completion"]),
                         callbacks=[TrackerCallback(ctx.tracker, "sft")])
    train(trainer, ctx)
    return merged(trainer, cfg.lora)


def logit_kd(student, tokenizer, dataset: Dataset, cfg: DistillConfig, ctx: StageContext, *,
             teacher=None, logits_file: Path | None = None):
    """Match the teacher's next-token distribution on the dataset's answers; returns the merged model.

    Give the ``teacher`` model (online: it runs at every step, and on-policy steps are possible) or
    the ``logits_file`` of ``tasks.teacher_logits.cached`` (offline: no teacher in memory).
    The two must share a vocabulary (``teacher_logits.require_shared_vocabulary``).
    """
    settings, model = cfg.logit_kd, with_adapters(student, cfg.lora)
    callbacks = [TrackerCallback(ctx.tracker, "logit_kd")]
    if logits_file is not None:
        args = training_args(TrainingArguments, settings, ctx, remove_unused_columns=False, **COUNT_TOKENS)
        trainer = kd.OfflineKD(model=model, args=args, train_dataset=teacher_logits.CachedLogits.load(logits_file),
                               data_collator=kd.collate_cached(tokenizer.pad_token_id), callbacks=callbacks,
                               kd=settings)
    else:
        examples = teacher_logits.tokenize(tokenizer, dataset, settings.max_length)
        rows = Dataset.from_list([{"input_ids": e.input_ids, "completion_mask": e.completion_mask, "prompt": ""}
                                  for e in examples])
        args = training_args(GKDConfig, settings, ctx, lmbda=settings.on_policy_fraction,
                             beta=kd.trl_beta(settings), temperature=settings.temperature,
                             max_new_tokens=settings.max_new_tokens, max_length=settings.max_length,
                             **COUNT_TOKENS)
        trainer = kd.OnlineKD(model=model, teacher_model=teacher, args=args, train_dataset=rows,
                              processing_class=tokenizer, callbacks=callbacks, kd=settings)
    train(trainer, ctx)
    return merged(trainer, cfg.lora)


def grpo(student, tokenizer, dataset: Dataset, cfg: DistillConfig, ctx: StageContext):
    """RL on the task's own check (the reward; against the teacher's answer where the data has no label),
    plus a bonus for the teacher's answer; returns the merged model.

    The KL penalty's reference is the phase's starting model (with LoRA: the base, adapters off).
    """
    settings = cfg.grpo
    stop_at_turn_end(student, tokenizer)
    rewards = [task_check_reward(ctx.task)]
    if settings.teacher_agreement_bonus:
        rewards.append(teacher_agreement)
    args = training_args(GRPOConfig, settings, ctx, num_generations=settings.num_generations,
                         beta=settings.beta, temperature=settings.temperature,
                         max_completion_length=settings.max_completion_length,
                         reward_weights=[1.0, settings.teacher_agreement_bonus][:len(rewards)])
    trainer = GRPOTrainer(model=with_adapters(student, cfg.lora), reward_funcs=rewards, args=args,
                          train_dataset=dataset.select_columns(["prompt", "label", "answer"]),
                          processing_class=tokenizer, callbacks=[TrackerCallback(ctx.tracker, "grpo")])
    train(trainer, ctx)
    return merged(trainer, cfg.lora)


def task_check_reward(task: TaskConfig):
    """The task's check as a TRL reward function: the same score the evaluator and the filter use, against
    each prompt's reference: its label where the data has one, else the teacher's kept answer (its majority
    answer under prototype.min_agreement). So the reward needs no gold label."""
    def task_check(completions, label, answer, **_) -> list[float]:
        return [checks.score(_answer(c), {task.label_field: reference or teacher}, task)
                for c, reference, teacher in zip(completions, label, answer)]
    return task_check


def teacher_agreement(completions, answer, **_) -> list[float]:
    """1 where the student gives the teacher's own (kept) answer."""
    return [float(_answer(c) == reference) for c, reference in zip(completions, answer)]



def _answer(completion) -> str:
    return (completion[0]["content"] if isinstance(completion, list) else completion).strip()


def stop_at_turn_end(model, tokenizer) -> None:
    """Sampled answers end at the chat template's end of turn, as the evaluator's choices do."""
    end_id = tokenizer.convert_tokens_to_ids(decoding.turn_end(tokenizer))
    eos = model.generation_config.eos_token_id
    eos = [] if eos is None else [eos] if isinstance(eos, int) else list(eos)
    if end_id is not None and end_id != tokenizer.unk_token_id and end_id not in eos:
        model.generation_config.eos_token_id = eos + [end_id]


PHASES = {"sft": sft, "logit_kd": logit_kd, "grpo": grpo}


def evaluated(model_dir: Path, ctx: StageContext, desc: str) -> Evaluation:
    """The shared evaluator's verdict on a phase's model, kept beside it so a resumed run reuses it."""
    saved = ctx.checkpoint_dir / "evaluation.json"
    if saved.is_file():
        return Evaluation(**json.loads(saved.read_text()))
    evaluation = evaluate_saved(model_dir, ctx.examples.eval, ctx.task, ctx.eval, ctx.device, desc=desc)
    saved.write_text(json.dumps(asdict(evaluation)))
    return evaluation


def _save_atomically(model, tokenizer, directory: Path) -> None:
    partial = directory.with_name(directory.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    save_model(model, tokenizer, partial)
    shutil.rmtree(directory, ignore_errors=True)
    os.rename(partial, directory)


def launch(phase: str, start: str | Path, out_dir: Path, dataset_dir: Path, sources: dict[str, str],
           cfg: DistillConfig, ctx: StageContext) -> None:
    """Run ``train_phase`` on ``cfg.processes`` GPUs: ``accelerate launch`` of this module's worker.

    The workers log to a file that is replayed into this stage's tracker when they finish.
    """
    request, metrics = ctx.checkpoint_dir / "launch.json", ctx.checkpoint_dir / "worker-metrics.jsonl"
    metrics.unlink(missing_ok=True)
    request.write_text(json.dumps({
        "phase": phase, "start": str(start), "out_dir": str(out_dir), "dataset_dir": str(dataset_dir),
        "sources": sources, "distill": cfg.model_dump(mode="json"), "task": ctx.task.model_dump(mode="json"),
        "seed": ctx.seed, "device": ctx.device.type, "checkpoint_dir": str(ctx.checkpoint_dir),
        "workdir": str(ctx.workdir), "metrics": str(metrics)}))
    command = launch_command(cfg, ctx.device, request)
    log.info("%s: launching %s", phase, " ".join(command))
    done = subprocess.run(command, capture_output=True, text=True, env=launch_env(cfg, ctx.device, os.environ))
    FileTracker.replay(metrics, ctx.tracker)
    if done.returncode != 0:
        raise RuntimeError(f"distill phase {phase} failed in its workers ({' '.join(command)}):\n"
                           f"{done.stderr[-4000:]}")


def launch_command(cfg: DistillConfig, device: torch.device, request: Path) -> list[str]:
    """``accelerate launch`` on one machine: DDP, or FSDP2 sharding whole decoder layers (``cfg.fsdp``)."""
    layout = (["--use_fsdp", "--fsdp_version", "2", "--fsdp_auto_wrap_policy", "TRANSFORMER_BASED_WRAP",
               "--fsdp_state_dict_type", "FULL_STATE_DICT"] if cfg.fsdp
              else ["--multi_gpu"] if cfg.processes > 1 else [])
    precision = ["--mixed_precision", "bf16"] if device.type == "cuda" else []
    return [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", str(cfg.processes),
            "--num_machines", "1", "--main_process_port", "0", *layout, *precision,
            "-m", "distilflow.tasks.distill", str(request)]


def launch_env(cfg: DistillConfig, device: torch.device, environ) -> dict[str, str]:
    """The workers see exactly ``cfg.processes`` GPUs (the first of those visible): a trainer that sees
    more GPUs than processes would spread one process over them (DataParallel), which TRL refuses."""
    if device.type != "cuda":
        return dict(environ)
    visible = environ.get("CUDA_VISIBLE_DEVICES") or ",".join(map(str, range(torch.cuda.device_count())))
    return {**environ, "CUDA_VISIBLE_DEVICES": ",".join(visible.split(",")[:cfg.processes])}


def _worker(request_path: str) -> None:
    """One ``accelerate launch`` worker: ``train_phase`` on this process's GPU (or the CPU), as ``launch`` asked.

    Rank 0 saves the model; every rank logs through the trainer, which sends only rank 0's curves.
    """
    request = json.loads(Path(request_path).read_text())
    # The launcher's contract: each worker finds its GPU in LOCAL_RANK.
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if request["device"] == "cuda" \
        else torch.device("cpu")
    ctx = StageContext(
        workdir=Path(request["workdir"]), out_dir=Path(request["out_dir"]),
        checkpoint_dir=Path(request["checkpoint_dir"]), device=device, seed=request["seed"],
        task=TaskConfig.model_validate(request["task"]), examples=TaskData(train=[], eval=[]), eval=EvalConfig(),
        tracker=FileTracker(Path(request["metrics"])))
    train_phase(request["phase"], request["start"], Path(request["out_dir"]),
                load_from_disk(request["dataset_dir"], keep_in_memory=True), request["sources"],
                DistillConfig.model_validate(request["distill"]), ctx)


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO)
    _worker(sys.argv[1])
