"""What the distillation benchmarks train on: randomly initialised models of real shapes, the demo task's data.

The GPU box has no model hub and takes at most 64 MiB of files, so the models are built from their
shapes (Llama architecture, a 49,152-token vocabulary like SmolLM2's; the text goes through the tiny
test tokenizer, whose ids are a subset). Speed and memory depend on the shapes, not on the weights.
"""

from pathlib import Path

import torch
from datasets import load_from_disk
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

from distilflow.configs.loader import load_config
from distilflow.tasks.context import StageContext
from distilflow.tasks.data import load_task_data
from distilflow.tasks.evaluate import Evaluator
from distilflow.tasks.prototype import write_dataset
from distilflow.tasks.tracking import Tracker

REPO = Path(__file__).resolve().parents[2]
TOKENIZER = REPO / "tests" / "assets" / "tiny-teacher"
CONFIG = REPO / "configs" / "tiny.yaml"

SHAPES = {  # hidden, MLP, layers, attention heads, KV heads
    "tiny": (64, 128, 4, 4, 2),
    "smollm2-135m": (576, 1536, 30, 9, 3),
    "smollm2-360m": (960, 2560, 32, 15, 5),
    "qwen2.5-0.5b": (896, 4864, 24, 14, 2),
    "smollm2-1.7b": (2048, 8192, 24, 32, 32),
}
VOCAB = 49152


def random_model(shape: str, directory: Path, seed: int) -> Path:
    """A randomly initialised causal LM of ``shape``, saved with the test tokenizer."""
    hidden, mlp, layers, heads, kv_heads = SHAPES[shape]
    tokenizer = AutoTokenizer.from_pretrained(TOKENIZER)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(LlamaConfig(
        vocab_size=VOCAB if shape != "tiny" else len(tokenizer), hidden_size=hidden, intermediate_size=mlp,
        num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv_heads,
        max_position_embeddings=2048, tie_word_embeddings=True, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id))
    model.to(torch.bfloat16).save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


def benchmark_config(overrides: dict):
    return load_config(CONFIG, {"task.max_train": None, **overrides})


def task_dataset(cfg, directory: Path, context_tickets: int = 1):
    """The demo task's training pool in the prototype stage's format, the reference labels as answers.

    With ``context_tickets`` > 1 each prompt carries that many consecutive tickets and the answer is the
    last one's queue: a long prompt with a short answer, the shape of retrieval-style KD workloads.
    """
    rows = load_task_data(cfg.task, cfg.run.seed).train
    rows = [{**row, "text": "\n".join(r["text"] for r in rows[max(0, i - context_tickets + 1):i + 1])}
            for i, row in enumerate(rows)]
    kept = [{"row": r, "answer": r["label"], "score": 1.0, "input_index": i, "sample": 0} for i, r in enumerate(rows)]
    write_dataset(kept, cfg.task, "reference labels", cfg.prototype, directory, directory / "dataset.jsonl")
    return load_from_disk(directory, keep_in_memory=True)


def context(cfg, workdir: Path, device: torch.device, tracker: Tracker) -> StageContext:
    evaluator = Evaluator(cfg.task, load_task_data(cfg.task, 0).eval, cfg.eval, device)
    return StageContext(workdir=workdir, out_dir=workdir / "out", checkpoint_dir=workdir / "checkpoints",
                        device=device, seed=cfg.run.seed, evaluator=evaluator, tracker=tracker)


def logged(records_file: Path) -> list[dict]:
    """The (metrics, step) records a FileTracker wrote."""
    import json

    return [r for r in map(json.loads, records_file.read_text().splitlines()) if "metrics" in r]


def training_summary(records: list[dict], phase: str) -> dict:
    """The trainer's last log of ``phase``: tokens seen per second of the training loop (summed over GPUs),
    its runtime."""
    return next(r["metrics"] for r in reversed(records) if f"{phase}.train_tokens_per_second" in r["metrics"])
