"""What a bundle tells the people who run it: how to serve it, how to ask it, and what it is.

Serving files for vLLM (serve.yaml, serve.sh, request.json, Dockerfile) and, with a GGUF export, for
llama.cpp (gguf/); the model card (README.md) with the journey chart; the teacher's license.
"""

import importlib.metadata
import json
import re
from importlib.resources import files
from pathlib import Path
from string import Template

import yaml
from huggingface_hub import ModelCard, ModelCardData

from distilflow.configs.schema import (DeployConfig, HttpTeacherConfig, ServingConfig, TaskCheck, TaskConfig,
                                       TeacherConfig)
from distilflow.tasks import data
from distilflow.tasks.journey import JourneyEntry, table
from distilflow.tasks.models import gguf_package_file, joined_gguf

LLAMA_CPP_PORT = 8080  # llama-server's default
MODEL_CARD_TEMPLATE = files("distilflow.tasks").joinpath("templates", "model_card.md")
HOST_COMMENT = "# this machine's clients only; 0.0.0.0 inside a container (the Dockerfile passes --host 0.0.0.0)"


# --- serving ------------------------------------------------------------------------------------

def checkpoint_config(model_dir: Path) -> dict:
    return json.loads((model_dir / "config.json").read_text())


def context_length(model_dir: Path, cfg: DeployConfig) -> int:
    return cfg.serve.max_model_len or checkpoint_config(model_dir)["max_position_embeddings"]


def compression_line(model_dir: Path, compress_journey: list[JourneyEntry]) -> str:
    """What the compress stage did, and the checkpoint's quantization as its config.json states it."""
    done = "; ".join(e.scheme for e in compress_journey if e.scheme)
    quantization = checkpoint_config(model_dir).get("quantization_config")
    if not quantization:
        return done or "none (bf16 weights)"
    weights = [group["weights"] for group in quantization.get("config_groups", {}).values() if group.get("weights")]
    stated = ", ".join(f"{w['num_bits']}-bit {w['type']} weights"
                       + (f" in groups of {w['group_size']}" if w.get("group_size") else f" per {w['strategy']}")
                       for w in weights)
    kept = ", ".join(quantization.get("ignore") or []) or "nothing"
    return (f"{done + ' — ' if done else ''}{quantization['quant_method']} `{quantization.get('format')}`: "
            f"{stated}; kept in 16 bits: {kept}")


def vllm_args(model_dir: Path, cfg: DeployConfig) -> dict:
    """`vllm serve` arguments for this checkpoint, read from its config.json."""
    config = checkpoint_config(model_dir)
    quantization = (config.get("quantization_config") or {}).get("quant_method")
    return {
        "served-model-name": cfg.model_name,
        "dtype": config.get("dtype") or config.get("torch_dtype") or "auto",
        "max-model-len": context_length(model_dir, cfg),
        **({"quantization": quantization} if quantization else {}),
        "generation-config": "auto",  # greedy decoding from generation_config.json; request.json sets max_tokens
        "host": cfg.serve.host,
        "port": cfg.serve.port,
    }


def chat_request(task: TaskConfig, row: dict, cfg: DeployConfig, constraint: dict) -> dict:
    """The OpenAI-compatible chat request a client sends: the prompt the model was trained on, greedy."""
    return {"model": cfg.model_name, "messages": data.messages(row, task), "temperature": 0,
            "max_tokens": cfg.max_new_tokens, **constraint}


def vllm_constraint(check: TaskCheck) -> dict:
    """vLLM's structured outputs: the answer is one of the labels, a match of the pattern, or JSON valid against the
    schema, as the evaluator's check wants it."""
    if check.type == "choice":
        return {"structured_outputs": {"choice": list(check.choices)}}
    if check.type == "regex":
        return {"structured_outputs": {"regex": check.pattern}}
    if check.type == "json_schema":
        return {"structured_outputs": {"json": check.json_schema}}
    return {}


def llama_cpp_constraint(check: TaskCheck) -> dict:
    """llama-server's constraint with the same effect as vLLM's: a GBNF grammar of the labels, or the JSON
    schema itself, which the server turns into its grammar (a GBNF, or llguidance's where it is built with it:
    sending the schema keeps request.json right for either build)."""
    if check.type == "choice":
        return {"grammar": "root ::= " + " | ".join(json.dumps(choice) for choice in check.choices)}
    if check.type == "json_schema":
        return {"json_schema": check.json_schema}
    return {}


def write_vllm_files(bundle: Path, task: TaskConfig, example: dict, cfg: DeployConfig, license: str | None) -> None:
    """serve.yaml (vLLM's --config file), serve.sh, request.json and the GPU Dockerfile."""
    args = vllm_args(bundle, cfg)
    settings = yaml.safe_dump(args, sort_keys=False).replace(
        f"\nhost: {args['host']}\n", f"\nhost: {args['host']}  {HOST_COMMENT}\n")
    (bundle / "serve.yaml").write_text(
        f"# vLLM server arguments for this bundle: vllm serve BUNDLE --config BUNDLE/serve.yaml\n{settings}")
    _write_script(bundle / "serve.sh", f"""\
# Serve this bundle with vLLM's OpenAI-compatible server on a GPU (pip install vllm). Spelled out:
#   {vllm_command(args, "BUNDLE")}
# Then ask it: curl -s localhost:{cfg.serve.port}/v1/chat/completions -H 'Content-Type: application/json' -d @request.json
set -euo pipefail
bundle="$(cd "$(dirname "${{BASH_SOURCE[0]}}")" && pwd)"
exec vllm serve "$bundle" --config "$bundle/serve.yaml" "$@"
""")
    _write_json(bundle / "request.json", chat_request(task, example, cfg, vllm_constraint(task.check)))
    (bundle / "Dockerfile").write_text(render_dockerfile(
        "serve-vllm.Dockerfile", base_image=cfg.serve.vllm_image, model_name=cfg.model_name,
        port=cfg.serve.port, license=_spdx(license), description=_description(task)))


def write_llama_cpp_files(gguf_dir: Path, gguf_file: str, context_length: int, task: TaskConfig, example: dict,
                          cfg: DeployConfig, license: str | None) -> None:
    """serve.sh, request.json and the CPU Dockerfile beside the GGUF file."""
    _write_script(gguf_dir / "serve.sh", f"""\
# Serve the GGUF export with llama.cpp's OpenAI-compatible llama-server (CPU). Then ask it:
#   curl -s localhost:{LLAMA_CPP_PORT}/v1/chat/completions -H 'Content-Type: application/json' -d @request.json
set -euo pipefail
here="$(cd "$(dirname "${{BASH_SOURCE[0]}}")" && pwd)"
exec llama-server --model "$here/{gguf_file}" --alias {cfg.model_name} --port {LLAMA_CPP_PORT} \\
    --ctx-size {context_length} --jinja "$@"
""")
    _write_json(gguf_dir / "request.json", chat_request(task, example, cfg, llama_cpp_constraint(task.check)))
    (gguf_dir / "Dockerfile").write_text(render_dockerfile(
        "serve-llamacpp.Dockerfile", base_image=cfg.serve.llama_cpp_image, model_name=cfg.model_name,
        port=LLAMA_CPP_PORT, gguf_file=gguf_file, context_length=context_length, license=_spdx(license),
        description=_description(task)))


def render_dockerfile(template: str, **values) -> str:
    """A serving Dockerfile from its template in docker/ (``${name}`` placeholders, all required)."""
    return Template(files("distilflow.docker").joinpath(template).read_text()).substitute(values)


def vllm_command(args: dict, model: str = ".") -> str:
    return f"vllm serve {model} " + " ".join(f"--{key} {value}" for key, value in args.items())


def _write_script(path: Path, body: str) -> None:
    path.write_text("#!/usr/bin/env bash\n" + body)
    path.chmod(0o755)


def _write_json(path: Path, content: dict) -> None:
    path.write_text(json.dumps(content, indent=1) + "\n")


def _spdx(license: str | None) -> str:
    return license or "NOASSERTION"  # SPDX's word for "not stated"


def _description(task: TaskConfig) -> str:
    text = f"Answers with one of: {', '.join(task.check.choices)}" if task.check.type == "choice" else "distilflow model"
    return text.replace('"', "'")


# --- the teacher's license -------------------------------------------------------------------------

LICENSE_FIELDS = ("license", "license_name", "license_link")


def teacher_card(cfg: TeacherConfig) -> dict:
    """Where the teacher came from and its license fields, read from its own files where present:
    a GGUF file's general.license*, a model dir's README.md front matter, or the package's metadata;
    an HTTP teacher is known by its endpoint and served model name only."""
    if isinstance(cfg, HttpTeacherConfig):
        return {"source": f"{cfg.model} at {cfg.base_url} (OpenAI-compatible endpoint)", "base_model": cfg.model}
    if cfg.gguf_package:
        gguf_file = gguf_package_file(cfg.gguf_package, cfg.gguf_file, "prototype.teacher")
        fields = _gguf_license(gguf_file)
        if not fields.get("license"):
            fields["license"] = _package_license(cfg.gguf_package)
        return {"source": f"{cfg.gguf_package}/{cfg.gguf_file} (PyPI package)", "gguf_file": str(gguf_file), **fields}
    if cfg.gguf_parts:
        gguf_file = joined_gguf(cfg.gguf_parts, cfg.gguf_file, cfg.gguf_sha256, "prototype.teacher")
        return {"source": f"{cfg.gguf_file}, joined from the PyPI packages {cfg.gguf_parts[0]} ... {cfg.gguf_parts[-1]}",
                "gguf_file": str(gguf_file), **_gguf_license(gguf_file)}
    path = Path(cfg.path)
    if not path.exists():
        return {"source": f"{cfg.path} (hub id)", "base_model": cfg.path}
    if cfg.gguf_file:
        return {"source": str(path / cfg.gguf_file), "gguf_file": str(path / cfg.gguf_file),
                **_gguf_license(path / cfg.gguf_file)}
    return {"source": str(path), **_readme_license(path / "README.md")}


def _gguf_license(path: Path) -> dict:
    from gguf import GGUFReader

    fields = GGUFReader(path).fields
    keys = {"license": "general.license", "license_name": "general.license.name",
            "license_link": "general.license.link", "name": "general.name"}
    return {ours: fields[theirs].contents() for ours, theirs in keys.items() if theirs in fields}


def _readme_license(readme: Path) -> dict:
    match = re.match(r"^---\n(.*?)\n---", readme.read_text(), re.S) if readme.is_file() else None
    front = yaml.safe_load(match.group(1)) if match else None
    front = front if isinstance(front, dict) else {}
    return {key: front[key] for key in (*LICENSE_FIELDS, "base_model") if front.get(key)}


def _package_license(package: str) -> str | None:
    distribution = importlib.metadata.packages_distributions().get(package, [package])[0]
    license = importlib.metadata.metadata(distribution).get("License")
    return license.lower() if license else None


# --- the model card --------------------------------------------------------------------------------

def journey_chart(journey: list[JourneyEntry], path: Path) -> Path:
    """Task score and size of every model state, side by side (PNG)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    journey = [e for e in journey if e.task_score is not None]  # not the served-only entries
    labels = [f"{e.state}\n({e.phase})" if e.phase else e.state for e in journey]
    figure, (score, size) = plt.subplots(1, 2, figsize=(10, 3.6))
    for axis, key, scale, fmt, color, title in (
            (score, "task_score", 1, "{:.2f}", "#4c72b0", "task score (held-out)"),
            (size, "size_bytes", 1e6, "{:.3g}", "#dd8452", "size on disk (MB)")):
        # A black-box (HTTP) teacher has a score but no size: its bar is left out, its label stays.
        values = [getattr(e, key) / scale if getattr(e, key) is not None else 0.0 for e in journey]
        axis.bar(labels, values, color=color)
        axis.set(title=title)
        for x, e in enumerate(journey):
            axis.annotate(fmt.format(values[x]) if getattr(e, key) is not None else "n/a", (x, values[x]),
                          ha="center", va="bottom", fontsize=8)
        axis.tick_params(axis="x", labelsize=8)
    score.set(ylim=(0, 1))
    figure.tight_layout()
    figure.savefig(path, dpi=120, metadata={"Software": None})
    plt.close(figure)
    return path


def cost_chart(journey: list[JourneyEntry], path: Path) -> Path | None:
    """Task score against dollars per 1,000 task requests (each state asked as its clients ask it: the teacher
    with its few-shot prompt), one at a time and at the measured rate in flight, for every state with a cost (PNG);
    None when no state has one. The score is the serving engine's where the state was served, else the HF
    evaluator's."""
    points = [(e, kind, e.cost_usd_per_1k_requests[kind]) for e in journey for kind in ("batch1", "throughput")
              if (e.cost_usd_per_1k_requests or {}).get(kind)]
    if not points:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    concurrency = next((e.serving["concurrency"] for e, _, _ in points if (e.serving or {}).get("concurrency")), "N")
    figure, axis = plt.subplots(figsize=(7.5, 4.5))
    for entry, kind, cost in points:
        score = (entry.serving or {}).get("task_score")
        score = entry.task_score if score is None else score
        if score is None:
            continue
        axis.scatter(cost, score, marker="o" if kind == "batch1" else "s",
                     facecolors="none" if kind == "batch1" else "#4c72b0", edgecolors="#4c72b0", s=50)
        axis.annotate(entry.label, (cost, score), fontsize=8, textcoords="offset points",
                      xytext=(4, 4) if kind == "batch1" else (4, -11))  # the two points of a state stay apart
    axis.scatter([], [], marker="o", facecolors="none", edgecolors="#4c72b0", label="one request at a time")
    axis.scatter([], [], marker="s", color="#4c72b0", label=f"{concurrency} requests in flight")
    axis.set(xscale="log", xlabel="US dollars per 1,000 task requests, prompt included (log scale)", ylabel="task score",
             title="Task score against serving cost", ylim=(0, 1.05))
    axis.legend(loc="lower right", fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=120, metadata={"Software": None})
    plt.close(figure)
    return path


def model_card(*, cfg: DeployConfig, task: TaskConfig, teacher: dict, student_summary: str, compression: str,
               journey: list[JourneyEntry], exports: list[str], smoke: list[str], vllm_command: str,
               gguf_file: str | None, data_card: str, cost_chart: bool = False,
               serving: ServingConfig = ServingConfig()) -> str:
    """README.md of the bundle: what the model is, how well it does, how to serve it, where not to use it
    (the text is templates/model_card.md)."""
    metadata = ModelCardData(
        license=teacher.get("license"), license_name=teacher.get("license_name"),
        license_link=teacher.get("license_link"), base_model=teacher.get("base_model"), library_name="transformers",
        pipeline_tag="text-generation",
        tags=["distilflow", "distillation", *(["compressed-tensors"] if "compressed-tensors" in compression else []),
              *(["gguf"] if gguf_file else [])])
    return str(ModelCard.from_template(
        metadata, template_str=MODEL_CARD_TEMPLATE.read_text(), deploy=cfg, task=task, teacher=teacher,
        student_summary=student_summary, compression=compression, journey_table=table(journey),
        exports=exports, smoke=smoke, vllm_command=vllm_command, gguf_file=gguf_file, data_card=data_card,
        cost_chart=cost_chart, serving=serving, llama_cpp_port=LLAMA_CPP_PORT))
