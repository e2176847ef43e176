"""Scaling: how distill and quantize time grow with the student's size and with the data.

Students are randomly initialised models of real shapes (speed depends on shapes, not weights); the data is
the demo task's training tickets. Distill is one SFT epoch through the stage's own ``distill.sft`` (LoRA, as
the pipeline's default), wall time including the adapter merge; quantize is ``tasks.quantize`` (W4A16-GPTQ and
FP8), wall time including the save. A short SFT run first warms the GPU up. Writes scaling.json and, where
matplotlib is installed, scaling.png:

    python -m tests.benchmarks.bench_scaling --out OUT                                        # GPU
    python -m tests.benchmarks.bench_scaling --out OUT --sizes tiny --data-model tiny \\
        --examples 16,32 --calibration 4,8 --device cpu                                       # CPU smoke
    python -m tests.benchmarks.bench_scaling --plot OUT/scaling.json                          # the PNG, anywhere
"""

import argparse
import json
import time
from pathlib import Path

import torch

from distilflow.configs.schema import QuantizeConfig
from distilflow.tasks import distill, quantize
from distilflow.tasks.models import load_model, parameter_count, resolve_device, size_on_disk
from distilflow.tasks.tracking import FileTracker
from tests.benchmarks.bench_quantization import CONFIG_FILE, calibration_texts, synchronize, text
from tests.benchmarks.distill_setup import (benchmark_config, context, logged, random_model, task_dataset,
                                             training_summary)
from tests.benchmarks.figures import draw_if_possible, pyplot, save_beside

SCHEMES = {"w4a16-gptq": QuantizeConfig(scheme="w4a16", method="gptq"), "fp8": QuantizeConfig(scheme="fp8")}


def distill_run(student_dir: Path, dataset, examples: int, device, work: Path, max_steps: int = -1) -> dict:
    """One SFT epoch over the first ``examples`` tickets (or ``max_steps``): wall time and tokens/s."""
    cfg = benchmark_config({"run.device": device.type, "distill.lora": {}, "distill.sft": {
        "num_train_epochs": 1, "max_steps": max_steps, "per_device_train_batch_size": 16, "max_length": 256,
        "save_steps": 10_000, "logging_steps": 1, "learning_rate": 1e-4}})
    records = work / "records.jsonl"
    ctx = context(cfg, work, device, FileTracker(records))
    student, tokenizer = load_model(student_dir, device)
    synchronize(device)
    start = time.perf_counter()
    distill.sft(student, tokenizer, dataset.select(range(examples)), cfg.distill, ctx)
    synchronize(device)
    wall = time.perf_counter() - start
    final = training_summary(logged(records), "sft")
    return {"examples": examples, "wall_s": wall, "tokens_per_s": final["sft.train_tokens_per_second"],
            "params": parameter_count(student)}


def quantize_run(student_dir: Path, scheme: str, calibration: list[dict], device, out: Path) -> dict:
    """Load, quantize with ``len(calibration)`` samples, save: wall time and size."""
    cfg = SCHEMES[scheme].model_copy(update={"calibration_samples": len(calibration)})
    synchronize(device)
    start = time.perf_counter()
    model, tokenizer = load_model(student_dir, device)
    quantize.quantize(model, tokenizer, cfg, calibration_texts(tokenizer, calibration), out)
    synchronize(device)
    return {"scheme": scheme, "calibration_samples": len(calibration), "wall_s": time.perf_counter() - start,
            "size_bytes": size_on_disk(out)}


def plot(result_file: Path) -> Path:
    plt = pyplot()
    result = json.loads(result_file.read_text())
    figure, (by_size, by_data) = plt.subplots(1, 2, figsize=(11, 4))
    sizes = result["by_size"]
    params = [row["distill"]["params"] / 1e6 for row in sizes]
    by_size.plot(params, [row["distill"]["wall_s"] for row in sizes], "o-", label="distill (1 SFT epoch, LoRA)")
    for scheme in SCHEMES:
        by_size.plot(params, [row[scheme]["wall_s"] for row in sizes], "s--", label=f"quantize {scheme}")
    by_size.set(xlabel="student parameters (M)", ylabel="wall time (s)", title="by student size")
    by_size.legend()
    distill_rows, quantize_rows = result["by_data"]["distill"], result["by_data"]["quantize"]
    by_data.plot([r["examples"] for r in distill_rows], [r["wall_s"] for r in distill_rows], "o-",
                 label="distill: training examples")
    by_data.plot([r["calibration_samples"] for r in quantize_rows], [r["wall_s"] for r in quantize_rows], "s--",
                 label="quantize w4a16-gptq: calibration samples")
    by_data.set(xlabel="examples / samples", ylabel="wall time (s)", title=f"by data ({result['data_model']})")
    by_data.legend()
    figure.suptitle(f"distilflow scaling on {result['device']}")
    return save_beside(figure, result_file)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path)
    parser.add_argument("--plot", type=Path, help="only draw the PNG of an earlier result file")
    parser.add_argument("--sizes", default="smollm2-135m,smollm2-360m,qwen2.5-0.5b,smollm2-1.7b")
    parser.add_argument("--data-model", default="smollm2-360m", help="the shape the data-size runs use")
    parser.add_argument("--examples", default="116,232,464", help="training examples for the data-size runs")
    parser.add_argument("--calibration", default="16,64,256", help="calibration samples for the data-size runs")
    parser.add_argument("--device", default="auto")
    args = parser.parse_args()
    if args.plot:
        print(plot(args.plot))
        return
    work, device = args.out, resolve_device(args.device)
    work.mkdir(parents=True, exist_ok=True)
    dataset = task_dataset(benchmark_config({}), work / "dataset")
    examples = [int(n) for n in args.examples.split(",")]
    samples = [int(n) for n in args.calibration.split(",")]
    rows = text(CONFIG_FILE, 0, max(samples + [64])).calibration
    students = {size: random_model(size, work / size / "student", seed=2)
                for size in dict.fromkeys(args.sizes.split(",") + [args.data_model])}

    distill_run(students[args.data_model], dataset, len(dataset), device, work / "warmup", max_steps=5)
    by_size = [{"size": size,
                "distill": distill_run(students[size], dataset, len(dataset), device, work / size / "sft"),
                **{scheme: quantize_run(students[size], scheme, rows[:64], device, work / size / scheme)
                   for scheme in SCHEMES}}
               for size in args.sizes.split(",")]
    data_dir = work / args.data_model
    by_data = {"distill": [distill_run(students[args.data_model], dataset, n, device, data_dir / f"sft-{n}")
                           for n in examples],
               "quantize": [quantize_run(students[args.data_model], "w4a16-gptq", rows[:n], device,
                                         data_dir / f"gptq-{n}") for n in samples]}
    result = {"date": time.strftime("%Y-%m-%d"), "device": torch.cuda.get_device_name() if device.type == "cuda"
              else "cpu", "data_model": args.data_model, "by_size": by_size, "by_data": by_data}
    out = work / "scaling.json"
    out.write_text(json.dumps(result, indent=1))
    print(json.dumps(result, indent=1))
    draw_if_possible(plot, out, __spec__.name)


if __name__ == "__main__":
    main()
