"""Stage 4, deploy: the bundle an operations team ships, proven by a smoke test in a fresh process.

The bundle is a Hugging Face model directory (so `vllm serve BUNDLE` and `from_pretrained(BUNDLE)`
work on it as is) plus how to serve it (serve.yaml, serve.sh, request.json, Dockerfile), an optional
GGUF export for llama.cpp (gguf/, with its own Dockerfile), the model card with the journey table and
chart, the journey, the eval report and a sha256 manifest (`distilflow verify BUNDLE` re-checks it).
"""

import json
import logging
import shutil
from pathlib import Path

from transformers import GenerationConfig

from distilflow.configs.schema import DeployConfig
from distilflow.tasks import gguf_export, package
from distilflow.tasks.artifacts import StageResult, write_manifest
from distilflow.tasks.context import StageContext
from distilflow.tasks.evaluate import evaluate_in_fresh_process

log = logging.getLogger("distilflow")

# optimum-onnx 0.1.0, the newest, requires transformers<4.58; this pipeline runs transformers 5.
ONNX_NOT_MADE = "ONNX: not made (optimum-onnx requires transformers<4.58; the pipeline runs transformers 5)"


def run(cfg: DeployConfig, upstream: dict[str, StageResult], ctx: StageContext) -> StageResult:
    bundle = ctx.out_dir / "bundle"
    shutil.copytree(upstream["compress"].path("model"), bundle)
    write_generation_config(bundle, cfg)
    teacher = teacher_card(upstream["prototype"])
    gguf_file = export_gguf(bundle, cfg, teacher) if cfg.gguf != "none" else None

    smoke_rows = ctx.examples.eval[:cfg.smoke_prompts]
    smoke = evaluate_in_fresh_process(bundle, ctx.examples.eval, ctx.task, ctx.eval, ctx.device,
                                      smoke_prompts=cfg.smoke_prompts, max_new_tokens=cfg.max_new_tokens)
    deployed = {**smoke.journey_entry("deployed"), "smoke_pass_rate": smoke.metrics["smoke_pass_rate"],
                "smoke_latency_s": smoke.metrics["smoke_latency_s"]}
    report = smoke.report()
    smoke_lines = [f"transformers ({ctx.device.type}): pass rate {deployed['smoke_pass_rate']:.2f} on "
                   f"{len(smoke_rows)} prompts, {deployed['smoke_latency_s']:.3f} s per answer"]
    if gguf_file:
        deployed["gguf_size_bytes"] = gguf_file.stat().st_size
        smoke_lines.append(smoke_gguf(gguf_file, smoke_rows, cfg, ctx, deployed, report))

    journey = [entry for stage in ("prototype", "distill", "compress") for entry in upstream[stage].journey]
    journey.append(deployed)
    (bundle / "journey.json").write_text(json.dumps(journey, indent=1))
    (bundle / "eval_report.json").write_text(json.dumps(report, indent=1))

    example = ctx.examples.eval[0]
    package.write_vllm_files(bundle, ctx.task, example, cfg, teacher.get("license"))
    if gguf_file:
        package.write_llama_cpp_files(gguf_file.parent, gguf_file.name, package.context_length(bundle, cfg),
                                      ctx.task, example, cfg, teacher.get("license"))
        (bundle / ".dockerignore").write_text("# the GPU image serves the safetensors checkpoint\ngguf/\n")
    package.journey_chart(journey, bundle / "journey.png")
    (bundle / "README.md").write_text(package.model_card(
        cfg=cfg, task=ctx.task, teacher=teacher, student_summary=student_line(upstream["distill"]),
        compression=package.compression_line(bundle, upstream["compress"].journey),
        journey=journey, exports=exports(bundle, gguf_file), smoke=smoke_lines,
        vllm_command=package.vllm_command(package.vllm_args(bundle, cfg)),
        gguf_file=gguf_file.name if gguf_file else None, data_card=upstream["prototype"].summary))
    write_manifest(bundle)

    metrics = {f"deployed.{k}": v for k, v in deployed.items() if k != "state"}
    ctx.tracker.log_metrics(metrics)
    for name in ("manifest.json", "journey.json", "journey.png", "README.md", "eval_report.json", "serve.yaml",
                 "request.json", "Dockerfile"):
        ctx.tracker.log_artifact(bundle / name, "bundle")
    return StageResult(stage="deploy", files={"bundle": "bundle"}, metrics=metrics, journey=[deployed],
                       summary=f"Bundle ready: {cfg.model_name}\n\n" + "".join(f"- smoke test, {line}\n"
                                                                                for line in smoke_lines))


def write_generation_config(bundle: Path, cfg: DeployConfig) -> None:
    """Greedy, short answers: what the task needs from a server that reads generation_config.json."""
    config = GenerationConfig.from_pretrained(bundle) if (bundle / "generation_config.json").exists() \
        else GenerationConfig()
    config.update(do_sample=False, max_new_tokens=cfg.max_new_tokens, temperature=None, top_p=None, top_k=None)
    config.save_pretrained(bundle)


def teacher_card(prototype: StageResult) -> dict:
    """The teacher's source and license fields, as the prototype stage recorded them."""
    if "teacher_card" not in prototype.files:
        return {"source": "not recorded by the prototype stage"}
    return json.loads(prototype.path("teacher_card").read_text())


def export_gguf(bundle: Path, cfg: DeployConfig, teacher: dict) -> Path:
    out = bundle / "gguf" / f"model-{cfg.gguf}.gguf"
    out.parent.mkdir()
    log.info("deploy: exporting GGUF (%s) to %s", cfg.gguf, out)
    return gguf_export.export(bundle, out, cfg.gguf, name=cfg.model_name, license=teacher.get("license"))


def smoke_gguf(gguf_file: Path, rows: list[dict], cfg: DeployConfig, ctx: StageContext, deployed: dict,
               report: dict) -> str:
    """The smoke test through llama.cpp where llama-cpp-python is installed (it compiles from source)."""
    if not gguf_export.llama_cpp_installed():
        log.warning("deploy: llama-cpp-python is not installed; the GGUF export is not smoke-tested")
        return "GGUF through llama.cpp: not run (llama-cpp-python is not installed: pip install 'distilflow[llama-cpp]')"
    result = gguf_export.smoke_in_fresh_process(gguf_file, rows, ctx.task, cfg.max_new_tokens)
    deployed["gguf_smoke_pass_rate"] = result["gguf_smoke_pass_rate"]
    deployed["gguf_smoke_latency_s"] = result["gguf_smoke_latency_s"]
    report["gguf_smoke"] = result["answers"]
    return (f"GGUF {cfg.gguf} through llama.cpp (CPU): pass rate {result['gguf_smoke_pass_rate']:.2f} on "
            f"{len(rows)} prompts, {result['gguf_smoke_latency_s']:.3f} s per answer")


def student_line(distill: StageResult) -> str:
    phases = [e["phase"] for e in distill.journey if e.get("phase")]
    return distill.summary.strip().replace("\n", " ") + (f" Phases: {', '.join(phases)}." if phases else "")


def exports(bundle: Path, gguf_file: Path | None) -> list[str]:
    quantization = (package.checkpoint_config(bundle).get("quantization_config") or {}).get("quant_method")
    made = [f"{quantization or 'bf16'} safetensors (vLLM, transformers)"]
    made.append(f"GGUF {gguf_file.stem.removeprefix('model-')} (llama.cpp): `gguf/{gguf_file.name}`, "
                f"{gguf_file.stat().st_size / 1e6:.1f} MB" if gguf_file else "GGUF: not made (deploy.gguf: none)")
    return made + [ONNX_NOT_MADE]
