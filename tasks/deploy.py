"""Stage 4, deploy: the bundle an operations team ships, proven by a smoke test in a fresh process, and
every model state of the journey measured where users serve it.

The bundle is a Hugging Face model directory (so `vllm serve BUNDLE` and `from_pretrained(BUNDLE)`
work on it as is) plus how to serve it (serve.yaml, serve.sh, request.json, Dockerfile), an optional
GGUF export for llama.cpp (gguf/, with its own Dockerfile), the model card with the journey table and
charts, the journey, the eval report and a sha256 manifest (`distilflow verify BUNDLE` re-checks it).
The serving measurements (tasks/serving.py) run the teacher, the student and the deployed artifact in
the engine the bundle targets on this run's device, and price them with deploy.cost.
"""

import json
import logging
import shutil
import tempfile
from dataclasses import dataclass, replace
from pathlib import Path

from transformers import GenerationConfig

from distilflow.configs.schema import DeployConfig
from distilflow.tasks import checks, data, gguf_export, journey, package, serving
from distilflow.tasks.artifacts import InArtifact, StageOutput, write_manifest
from distilflow.tasks.compress import CompressOutput
from distilflow.tasks.context import StageContext
from distilflow.tasks.distill import DistillOutput
from distilflow.tasks.journey import JourneyEntry
from distilflow.tasks.prototype import PrototypeOutput
from distilflow.tasks.tracking import flatten

log = logging.getLogger("distilflow")

# optimum-onnx 0.1.0, the newest, requires transformers<4.58; this pipeline runs transformers 5.
ONNX_NOT_MADE = "ONNX: not made (optimum-onnx requires transformers<4.58; the pipeline runs transformers 5)"


@dataclass(kw_only=True)
class DeployOutput(StageOutput):
    """The bundle, and the whole journey, every state measured served."""

    bundle: InArtifact
    deployed: JourneyEntry  # the bundle's row of the journey
    journey: list[JourneyEntry]  # every state, in order, as the bundle's journey.json holds it


def run(cfg: DeployConfig, prototype: PrototypeOutput, distill: DistillOutput, compress: CompressOutput,
        ctx: StageContext) -> DeployOutput:
    evaluator, bundle = ctx.evaluator, ctx.out_dir / "bundle"
    shutil.copytree(compress.model, bundle)
    write_generation_config(bundle)
    teacher = prototype.teacher_card
    gguf_file = export_gguf(gguf_source(compress, distill, bundle, cfg.gguf), bundle, cfg, teacher) \
        if cfg.gguf != "none" else None

    smoke_rows = evaluator.rows[:cfg.smoke_prompts]
    smoke = evaluator.in_fresh_process(bundle, smoke_prompts=cfg.smoke_prompts, max_new_tokens=cfg.max_new_tokens)
    deployed = smoke.journey_entry("deployed", smoke_pass_rate=smoke.metrics["smoke_pass_rate"],
                                   smoke_latency_s=smoke.metrics["smoke_latency_s"])
    report = smoke.report()
    smoke_lines = [f"transformers ({ctx.device.type}): pass rate {deployed.smoke_pass_rate:.2f} on "
                   f"{len(smoke_rows)} prompts, {deployed.smoke_latency_s:.3f} s per answer"]
    if gguf_file:
        deployed.gguf_file, deployed.gguf_size_bytes = f"gguf/{gguf_file.name}", gguf_file.stat().st_size

    # Copies: the upstream outputs stay as their stages published them.
    states = [replace(entry) for entry in (*prototype.journey, *distill.journey, *compress.journey)] + [deployed]
    states = served_journey(states, prototype, distill, compress, bundle, gguf_file, cfg, ctx, report)
    if gguf_file:
        smoke_lines.append(smoke_gguf(gguf_file, smoke_rows, cfg, ctx, deployed, report))
    journey.write(states, bundle)
    (bundle / "eval_report.json").write_text(json.dumps(report, indent=1))

    task, example = evaluator.task, evaluator.rows[0]
    package.write_vllm_files(bundle, task, example, cfg, teacher.get("license"))
    if gguf_file:
        package.write_llama_cpp_files(gguf_file.parent, gguf_file.name, package.context_length(bundle, cfg),
                                      task, example, cfg, teacher.get("license"))
        (bundle / ".dockerignore").write_text("# the GPU image serves the safetensors checkpoint\ngguf/\n")
    package.journey_chart(states, bundle / "journey.png")
    cost_chart = package.cost_chart(states, bundle / "cost.png")
    (bundle / "README.md").write_text(package.model_card(
        cfg=cfg, task=task, teacher=teacher, student_summary=student_line(distill),
        compression=package.compression_line(bundle, compress.journey),
        journey=states, exports=exports(bundle, gguf_file), smoke=smoke_lines,
        vllm_command=package.vllm_command(package.vllm_args(bundle, cfg)),
        gguf_file=gguf_file.name if gguf_file else None, data_card=prototype.summary,
        cost_chart=cost_chart is not None, serving=evaluator.settings.serving))
    write_manifest(bundle)

    metrics = {f"deployed.{k}": v for k, v in flatten(deployed.as_json()).items() if k != "state"}
    metrics.update({f"{e.key}.{k}": v for e in states if e is not deployed for k, v in flatten(
        {"serving": e.serving or {}, "cost_usd_per_mtok": e.cost_usd_per_mtok or {},
         "cost_usd_per_1k_requests": e.cost_usd_per_1k_requests or {}}).items()})
    ctx.tracker.log_metrics(metrics)
    for name in ("manifest.json", journey.FILE, "journey.png", "README.md", "eval_report.json", "serve.yaml",
                 "request.json", "Dockerfile", *(["cost.png"] if cost_chart else [])):
        ctx.tracker.log_artifact(bundle / name, "bundle")
    return DeployOutput(bundle=bundle, deployed=deployed, journey=states,
                        summary=f"Bundle ready: {cfg.model_name}\n\n" + "".join(f"- smoke test, {line}\n"
                                                                                for line in smoke_lines))


def gguf_source(compress: CompressOutput, distill: DistillOutput, bundle: Path, gguf_type: str) -> Path:
    """What the GGUF is made from: the shipped checkpoint when Q4_0 stores its 4-bit weights exactly (GPTQ's
    rounding kept), else the shipped candidate before quantization (rounding rounded weights again adds error):
    its pruned model, or the student."""
    if gguf_type == "q4_0" and gguf_export.on_q4_0_grid(bundle):
        return bundle
    return compress.pruned_model or distill.student


def served_journey(states: list[JourneyEntry], prototype: PrototypeOutput, distill: DistillOutput,
                   compress: CompressOutput, bundle: Path, gguf_file: Path | None, cfg: DeployConfig,
                   ctx: StageContext, report: dict) -> list[JourneyEntry]:
    """The journey with each state's ``serving`` measurements and ``cost_usd_per_mtok``; the teacher's own
    GGUF file (when it came as one) is an entry of its own, ``teacher-gguf``. A state with no servable form
    on this engine says why instead of a number."""
    evaluator = ctx.evaluator
    engine = serving.choose_engine(evaluator.settings.serving, ctx.device.type)
    engine = engine and serving.priced(engine, cfg.cost)
    teacher = prototype.teacher_card
    if teacher.get("gguf_file"):
        at = states.index(journey.find(states, "teacher")) + 1
        states.insert(at, JourneyEntry(
            "teacher-gguf", note=f"the teacher's own GGUF file, {Path(teacher['gguf_file']).name}, served as is"))
    models = ServableModels(teacher=prototype.teacher, teacher_gguf=teacher.get("gguf_file"), student=distill.student,
                            student_phase=distill.last_phase.phase, pruned=compress.pruned_model, bundle=bundle,
                            gguf_file=gguf_file)
    with tempfile.TemporaryDirectory(prefix="distilflow-serving-") as scratch:
        for entry in states:
            if entry.state == "baseline":  # served in-process by scikit-learn, measured where it was trained
                entry.serving = {**entry.serving, "usd_per_hour": serving.cpu_price(cfg.cost, entry.serving["threads"])}
                entry.cost_usd_per_1k_requests = serving.request_cost_entry(entry.serving)
                continue
            form = "eval.serving.skip_states" if entry.state in evaluator.settings.serving.skip_states else \
                servable_form(entry, engine, models)
            if isinstance(form, str):
                entry.serving = serving.not_measured(engine, form)
            else:
                workload = serving.Workload(evaluator.rows, evaluator.task,
                                            shots=prototype.few_shot if entry.state.startswith("teacher") else ())
                artifact = form if engine.name == serving.VLLM or form.suffix == ".gguf" else \
                    export_for_serving(form, Path(scratch) / f"{entry.state}-f16.gguf")
                entry.serving = serving.measure(artifact, engine, workload, evaluator.settings.serving)
                answers = entry.serving.pop("answers")
                report.setdefault("engine_answers", {})[entry.state] = [
                    {"input": data.user_message(row, evaluator.task), "answer": a,
                     "label": checks.label(row, evaluator.task)}
                    for row, a in zip(evaluator.rows, answers)]
            entry.cost_usd_per_mtok = serving.cost_entry(entry.serving)
            entry.cost_usd_per_1k_requests = serving.request_cost_entry(entry.serving)
    if cfg.cost.teacher_usd_per_mtok and prototype.teacher is None:
        api = journey.find(states, "teacher")
        api.cost_usd_per_mtok = dict.fromkeys(("batch1", "throughput"), cfg.cost.teacher_usd_per_mtok)
        api.serving["not_measured"] += "; its cost is the API's price, deploy.cost.teacher_usd_per_mtok"
    return states


@dataclass(frozen=True, kw_only=True)
class ServableModels:
    """Where the states' files are, as the stages made them."""

    teacher: Path | None  # its weights; None: an HTTP teacher
    teacher_gguf: str | None  # the GGUF file the teacher came as, if it did
    student: Path  # the student after the last phase (the only one kept)
    student_phase: str  # that phase
    pruned: Path | None  # the chosen candidate's pruned model, if it was pruned
    bundle: Path
    gguf_file: Path | None  # the bundle's GGUF export; None: deploy.gguf is none


def servable_form(entry: JourneyEntry, engine: "serving.Engine | None", models: ServableModels) -> Path | str:
    """What the engine serves for ``entry``: a GGUF file or a checkpoint directory (exported to f16 GGUF
    for llama.cpp), or the reason it serves nothing."""
    if engine is None:
        return "eval.serving.engine is none"
    state, llama_cpp = entry.state, engine.name == serving.LLAMA_CPP
    if state == "teacher":
        return models.teacher or "an HTTP teacher: no weights to serve here"
    if state == "teacher-gguf":
        return Path(models.teacher_gguf) if llama_cpp else "a GGUF file: llama.cpp's, and this run's engine is vLLM"
    if state == "student":
        return models.student if entry.phase == models.student_phase else "only the last phase's student is kept"
    if state == "pruned":
        return models.pruned
    if state == "quantized":
        return "compressed-tensors: vLLM (GPU) only; on CPUs see deployed (GGUF)" if llama_cpp \
            else "the same checkpoint as deployed (measured there)"
    if llama_cpp:
        return models.gguf_file or "deploy.gguf is none: no CPU artifact to serve"
    return "a qlr bundle: vLLM serves its adapter only with --enable-lora" \
        if (models.bundle / "adapter_config.json").exists() else models.bundle


def export_for_serving(model_dir: Path, out_file: Path) -> Path:
    """An f16 GGUF of a checkpoint, made only to measure it (in a temp dir, never in the bundle)."""
    log.info("deploy: exporting %s to f16 GGUF to serve it with llama.cpp", model_dir)
    return gguf_export.export(model_dir, out_file, "f16", name=model_dir.name)


def write_generation_config(bundle: Path) -> None:
    """Greedy decoding, for servers that read generation_config.json. No max_new_tokens: vLLM reads it as the
    default (older versions: the ceiling) of every request's max_tokens; request.json sets its own."""
    config = GenerationConfig.from_pretrained(bundle) if (bundle / "generation_config.json").exists() \
        else GenerationConfig()
    config.update(do_sample=False, max_new_tokens=None, temperature=None, top_p=None, top_k=None)
    config.save_pretrained(bundle)


def export_gguf(source: Path, bundle: Path, cfg: DeployConfig, teacher: dict) -> Path:
    out = bundle / "gguf" / f"model-{cfg.gguf}.gguf"
    out.parent.mkdir()
    log.info("deploy: exporting GGUF (%s) of %s to %s", cfg.gguf, source, out)
    return gguf_export.export(source, out, cfg.gguf, name=cfg.model_name, license=teacher.get("license"))


def smoke_gguf(gguf_file: Path, rows: list[dict], cfg: DeployConfig, ctx: StageContext, deployed: JourneyEntry,
               report: dict) -> str:
    """The GGUF answers ``rows`` through llama.cpp's server, checked by the task's validator: by free greedy
    generation (what a client that sends no grammar gets), or for a json_schema task under the schema as
    request.json sends it (what could fail there is the server's grammar over this GGUF's vocabulary)."""
    task = ctx.evaluator.task
    constraint = package.llama_cpp_constraint(task.check) if task.check.type == "json_schema" else {}
    answers = serving.smoke(gguf_file, rows, task, cfg.max_new_tokens, ctx.evaluator.settings.serving, constraint)
    deployed.gguf_smoke_pass_rate = sum(checks.is_valid(a, task) for a in answers) / len(rows)
    report["gguf_smoke"] = [{"input": data.user_message(row, task), "answer": a, "label": checks.label(row, task)}
                            for row, a in zip(rows, answers)]
    return (f"GGUF {cfg.gguf} through llama.cpp (CPU, {'under the JSON schema' if constraint else 'free generation'}"
            f"): pass rate {deployed.gguf_smoke_pass_rate:.2f} on {len(rows)} prompts")


def student_line(distill: DistillOutput) -> str:
    phases = [e.phase for e in distill.journey if e.phase]
    return distill.summary.strip().replace("\n", " ") + (f" Phases: {', '.join(phases)}." if phases else "")


def exports(bundle: Path, gguf_file: Path | None) -> list[str]:
    quantization = (package.checkpoint_config(bundle).get("quantization_config") or {}).get("quant_method")
    made = [f"{quantization or 'bf16'} safetensors (vLLM, transformers)"]
    made.append(f"GGUF {gguf_file.stem.removeprefix('model-')} (llama.cpp): `gguf/{gguf_file.name}`, "
                f"{gguf_file.stat().st_size / 1e6:.1f} MB" if gguf_file else "GGUF: not made (deploy.gguf: none)")
    return made + [ONNX_NOT_MADE]
