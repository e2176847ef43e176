"""GPU check of the bitsandbytes teacher path (`prototype.teacher.load_in_4bit / load_in_8bit`), which a
CPU box can only refuse: the teacher loads quantized, answers the task, is saved by the prototype
stage's save_model and reloads from disk answering the same. Prints one JSON object: per mode, GPU
memory after loading, task score, tokens/s, size on disk, and whether the reloaded teacher agrees.

    python tests/benchmarks/bench_teacher_bitsandbytes.py [MODEL_DIR] [--config configs/tiny.yaml]

MODEL_DIR is a Hugging Face dir (bitsandbytes does not quantize GGUF files); default: the tiny teacher.
"""

import argparse
import json
import tempfile
from pathlib import Path

import torch

from distilflow.configs.loader import load_config
from distilflow.configs.schema import LocalTeacherConfig
from distilflow.tasks import data
from distilflow.tasks.evaluate import Evaluator, Prompting
from distilflow.tasks.models import load_model, save_model, size_on_disk
from distilflow.tasks.teachers import LocalTeacher, open_teacher

REPO = Path(__file__).resolve().parents[2]
MODES = {"bf16": {}, "4bit": {"load_in_4bit": True}, "8bit": {"load_in_8bit": True}}


def measure(model_dir: str, mode: dict, cfg, split, device) -> dict:
    torch.cuda.reset_peak_memory_stats()
    teacher = open_teacher(LocalTeacherConfig(path=model_dir, **mode), device)
    loaded_bytes = torch.cuda.memory_allocated()
    prompting = Prompting(tuple(data.few_shot_examples(split.pool, cfg.task, cfg.prototype.few_shot, 0)))
    baseline = teacher.evaluate(Evaluator(cfg.task, split.eval, cfg.eval, device), prompting)
    answers = [p["answer"] for p in baseline.predictions]
    with tempfile.TemporaryDirectory() as saved:
        save_model(teacher.model, teacher.tokenizer, Path(saved))
        size = size_on_disk(Path(saved))
        del teacher
        torch.cuda.empty_cache()
        reloaded = LocalTeacher(*load_model(Path(saved), device), name="reloaded")
        again = [a[0] for a in reloaded.answer(split.eval, cfg.task, prompting)]
    return {"gpu_memory_after_load_mb": loaded_bytes / 1e6, "task_score": baseline.metrics["task_score"],
            "tokens_per_s": baseline.metrics["tokens_per_s"], "saved_mb": size / 1e6,
            "reload_agreement": sum(a == b for a, b in zip(answers, again)) / len(answers)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model_dir", nargs="?", default=str(REPO / "tests" / "assets" / "tiny-teacher"))
    parser.add_argument("--config", default=str(REPO / "configs" / "tiny.yaml"))
    args = parser.parse_args()
    device = torch.device("cuda")
    cfg = load_config(args.config)
    split = data.load_task_data(cfg.task, cfg.run.seed)
    results = {"model_dir": args.model_dir, "gpu": torch.cuda.get_device_name()}
    for name, mode in MODES.items():
        try:
            results[name] = measure(args.model_dir, mode, cfg, split, device)
        except Exception as err:  # report every mode, even when one fails
            results[name] = {"error": f"{type(err).__name__}: {err}"}
    print(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
