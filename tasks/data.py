"""The task's data: reading examples, the held-out split, and the prompts models see."""

import json
import random
import string
from dataclasses import dataclass
from itertools import zip_longest
from pathlib import Path

from distilflow.configs.schema import TaskConfig
from distilflow.tasks.errors import DistilflowError


@dataclass(frozen=True)
class TaskData:
    """The task's examples, split once (seeded) so every stage sees the same held-out set."""

    train: list[dict]
    eval: list[dict]


def load_task_data(cfg: TaskConfig, seed: int) -> TaskData:
    rows = read_rows(cfg.data)
    _check_rows(rows, cfg)
    rows = random.Random(seed).sample(rows, len(rows))
    labelled = [row for row in rows if label(row, cfg) is not None]
    if len(labelled) <= cfg.eval_size:
        raise DistilflowError(
            f"{cfg.data}: {len(labelled)} labelled examples, but task.eval_size is {cfg.eval_size}; "
            "the held-out split needs labels and the training pool needs at least one example")
    held_out = labelled[:cfg.eval_size]
    held_out_ids = {id(row) for row in held_out}
    train = [row for row in rows if id(row) not in held_out_ids][:cfg.max_train]
    return TaskData(train=train, eval=held_out)


def read_rows(path: Path) -> list[dict]:
    rows = []
    with open(path, encoding="utf-8") as lines:
        for number, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                raise DistilflowError(f"{path}:{number}: not valid JSON ({err.msg})") from None
            if not isinstance(row, dict):
                raise DistilflowError(f"{path}:{number}: expected a JSON object per line")
            rows.append(row)
    if not rows:
        raise DistilflowError(f"{path}: no examples (task.data is empty)")
    return rows


def _check_rows(rows: list[dict], cfg: TaskConfig) -> None:
    needed = _template_fields(cfg.template)
    for number, row in enumerate(rows, start=1):
        missing = sorted(needed - row.keys())
        if missing:
            raise DistilflowError(
                f"{cfg.data}: example {number} has no field {', '.join(missing)} "
                "(task.template names it)")
        answer = label(row, cfg)
        if answer is not None and answer not in cfg.check.choices:
            raise DistilflowError(
                f"{cfg.data}: example {number} has label {answer!r}, not one of task.check.choices "
                f"{cfg.check.choices}")


def _template_fields(template: str) -> set[str]:
    return {name for _, name, _, _ in string.Formatter().parse(template) if name}


def label(row: dict, cfg: TaskConfig) -> str | None:
    """The reference answer of ``row``, or None when it is unlabelled."""
    return row.get(cfg.label_field) if cfg.label_field else None


def few_shot_examples(train: list[dict], cfg: TaskConfig, k: int, seed: int) -> list[dict]:
    """k labelled training examples, cycling through the labels so each is shown (seeded)."""
    rng = random.Random(seed)
    pools = [[r for r in train if label(r, cfg) == choice] for choice in cfg.check.choices]
    shuffled = [rng.sample(pool, len(pool)) for pool in pools]
    shots = [shot for turn in zip_longest(*shuffled) for shot in turn if shot is not None][:k]
    return rng.sample(shots, len(shots))


def messages(row: dict, cfg: TaskConfig, shots: list[dict] = ()) -> list[dict]:
    """The chat a model answers for ``row``: system prompt, few-shot turns, then the input."""
    chat = [{"role": "system", "content": cfg.system_prompt}] if cfg.system_prompt else []
    for shot in shots:
        chat += [{"role": "user", "content": cfg.template.format(**shot)},
                 {"role": "assistant", "content": label(shot, cfg)}]
    return chat + [{"role": "user", "content": cfg.template.format(**row)}]


def render(tokenizer, chat: list[dict]) -> str:
    """A chat as the model's own chat template writes it, ready for the assistant's answer."""
    return tokenizer.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)


# Content-free inputs for contextual calibration (Zhao et al. 2021, "Calibrate Before Use").
CONTENT_FREE_TEXTS = ("N/A", "", "[MASK]")


def content_free_rows(cfg: TaskConfig) -> list[dict]:
    """Rows whose every template field is a content-free text."""
    fields = _template_fields(cfg.template)
    return [{name: text for name in fields} for text in CONTENT_FREE_TEXTS]
