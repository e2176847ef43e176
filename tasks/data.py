"""The task's data: reading examples, the held-out split, and the prompts models see."""

import csv
import difflib
import io
import json
import math
import random
import string
import unicodedata
from dataclasses import dataclass, field
from itertools import zip_longest
from pathlib import Path

from distilflow.configs.loader import decode_text
from distilflow.configs.schema import PrototypeConfig, TaskConfig
from distilflow.tasks import checks
from distilflow.tasks.errors import DistilflowError

FORMATS = "a .jsonl, .json, .csv, .tsv or .parquet file, or a directory written by datasets' save_to_disk"


@dataclass(frozen=True)
class TaskData:
    """The task's examples, split once (seeded) so every stage sees the same sets.

    ``eval`` (the held-out split) shares no input with ``train`` or ``pool``: inputs are deduplicated
    (``normalized_input``) before the split, and each row lands in exactly one set.
    """

    train: list[dict]  # inputs the teacher answers: the distillation set is made from them
    eval: list[dict]  # labelled, held out: every model's task score
    pool: list[dict] = field(default_factory=list)  # labelled: few-shot examples and the sets that score them
    duplicates: int = 0  # rows dropped before the split because an earlier row had the same input


def load_task_data(cfg: TaskConfig, seed: int) -> TaskData:
    rows = [_map_fields(row, number, cfg) for number, row in enumerate(read_rows(cfg.data, cfg.data_split), start=1)]
    _check_rows(rows, cfg)
    unique = deduplicated(rows, cfg)
    unique = random.Random(seed).sample(unique, len(unique))
    labelled = [row for row in unique if checks.label(row, cfg) is not None]
    if len(labelled) <= cfg.eval_size:
        raise DistilflowError(
            f"{cfg.data}: {len(labelled)} labelled examples (after removing {len(rows) - len(unique)} duplicate "
            f"inputs), but task.eval_size is {cfg.eval_size}; the held-out split needs labels and the training "
            "pool needs at least one example")
    held_out = labelled[:cfg.eval_size]
    set_aside = labelled[cfg.eval_size:][:cfg.few_shot_pool] if cfg.few_shot_pool is not None else []
    taken = {id(row) for row in held_out + set_aside}
    train = [row for row in unique if id(row) not in taken][:cfg.max_train]
    if not train:
        raise DistilflowError(
            f"{cfg.data}: no training inputs left after the held-out split (task.eval_size {cfg.eval_size}) and "
            f"the few-shot pool (task.few_shot_pool {cfg.few_shot_pool}); add inputs or lower those settings")
    pool = set_aside if cfg.few_shot_pool is not None else [row for row in train if checks.label(row, cfg) is not None]
    return TaskData(train=train, eval=held_out, pool=pool, duplicates=len(rows) - len(unique))


def deduplicated(rows: list[dict], cfg: TaskConfig) -> list[dict]:
    """One row per input (``normalized_input``): the first labelled one, else the first. A held-out input
    that also appeared among the training inputs would test memory, not skill."""
    chosen: dict[str, dict] = {}
    for row in rows:
        key = normalized_input(row, cfg)
        if key not in chosen or (checks.label(chosen[key], cfg) is None and checks.label(row, cfg) is not None):
            chosen[key] = row
    return list(chosen.values())


def normalized_input(row: dict, cfg: TaskConfig) -> str:
    """What the model reads of ``row`` (its user message), with case, Unicode forms and runs of whitespace
    ignored: two rows that differ only in those are the same input."""
    return " ".join(unicodedata.normalize("NFKC", user_message(row, cfg)).split()).casefold()


def check_few_shot_pool(examples: TaskData, task: TaskConfig, prototype: PrototypeConfig) -> None:
    """The labelled pool holds enough examples for the few-shot settings: the shots, and with several
    candidate sets, the examples that score each set (never its own shots); with kNN demonstrations, one more than
    the shots, since a pool row is never its own neighbour."""
    knn = prototype.demonstrations == "knn"
    needed = max(prototype.few_shot + (prototype.shot_dev_size if prototype.shot_candidates > 1 else 0),
                 prototype.few_shot + 1 if knn else 0)
    rounds = prototype.ensemble is not None and prototype.ensemble.self_training_rounds > 0
    if rounds and not knn and len(examples.pool) <= prototype.few_shot * prototype.ensemble.shot_sets:
        raise DistilflowError(
            f"{task.data}: prototype.ensemble.self_training_rounds keeps a round only if the ensemble's score on pool "
            f"rows that no few-shot set shows does not drop, but the labelled pool has {len(examples.pool)} examples "
            f"and its {prototype.ensemble.shot_sets} set(s) of prototype.few_shot ({prototype.few_shot}) may show "
            "them all. Raise task.few_shot_pool, or lower prototype.few_shot or prototype.ensemble.shot_sets")
    if len(examples.pool) >= needed:
        return
    source = f"task.few_shot_pool is {task.few_shot_pool}" if task.few_shot_pool is not None else \
        "task.few_shot_pool is unset: the labelled training inputs"
    wants = f"prototype.few_shot ({prototype.few_shot})" + (
        f" + prototype.shot_dev_size ({prototype.shot_dev_size}, since prototype.shot_candidates is "
        f"{prototype.shot_candidates})" if prototype.shot_candidates > 1 else "") + (
        " + 1 (prototype.demonstrations is knn: a pool example is never its own neighbour)"
        if knn and needed == prototype.few_shot + 1 else "")
    raise DistilflowError(
        f"{task.data}: the labelled few-shot pool has {len(examples.pool)} examples ({source}; labelled examples "
        f"outside the held-out split of task.eval_size {task.eval_size}), but {wants} needs {needed}. Label more "
        "examples, raise task.few_shot_pool, or lower those prototype settings")


def read_rows(path: Path, split: str | None = None) -> list[dict]:
    """Every example in ``path`` as a dict, whatever the format (see FORMATS). Text files are UTF-8 (or UTF-16
    with a byte-order mark); a CSV's delimiter (comma, semicolon, tab) is read from its header line."""
    if path.is_dir():
        rows = _read_saved_dataset(path, split)
    elif not path.is_file():
        raise DistilflowError(f"task.data: {path} is not a regular file (a pipe or a device?); use {FORMATS}")
    elif split is not None:
        raise DistilflowError(f"task.data_split is {split!r}, but {path} is a file, not a `datasets` directory with "
                              "splits; remove task.data_split")
    elif path.suffix in (".jsonl", ".json", ".csv", ".tsv"):
        text = decode_text(path.read_bytes(), path)
        rows = {".jsonl": _read_jsonl, ".json": _read_json}.get(path.suffix, _read_csv)(text, path)
    elif path.suffix == ".parquet":
        rows = _read_parquet(path)
    else:
        raise DistilflowError(f"task.data: {path}: unknown format; use {FORMATS}")
    if not rows:
        raise DistilflowError(f"{path}: no examples (task.data is empty)")
    return rows


def _read_jsonl(text: str, path: Path) -> list[dict]:
    rows = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            raise DistilflowError(f"{path}:{number}: not valid JSON ({err.msg})") from None
        except RecursionError:
            raise DistilflowError(f"{path}:{number}: nested too deeply to be an example") from None
        if not isinstance(row, dict):
            raise DistilflowError(f"{path}:{number}: expected a JSON object per line")
        rows.append(row)
    return rows


def _read_json(text: str, path: Path) -> list[dict]:
    try:
        rows = json.loads(text)
    except json.JSONDecodeError as err:
        raise DistilflowError(f"{path}: not valid JSON ({err.msg}, line {err.lineno})") from None
    except RecursionError:
        raise DistilflowError(f"{path}: nested too deeply to be a list of examples") from None
    if not isinstance(rows, list) or not all(isinstance(row, dict) for row in rows):
        raise DistilflowError(f"{path}: expected a JSON list of objects (or use .jsonl, one object per line)")
    return rows


def _read_csv(text: str, path: Path) -> list[dict]:
    header = text.split("\n", 1)[0]
    delimiter = "\t" if path.suffix == ".tsv" else max(",;\t", key=header.count)
    csv.field_size_limit(max(csv.field_size_limit(), len(text)))  # a cell as long as JSONL's may be (default: 128K)
    reader = csv.reader(io.StringIO(text, newline=""), delimiter=delimiter)
    try:
        columns = next(reader, [])
        repeated = sorted({c for c in columns if columns.count(c) > 1})
        if repeated:
            raise DistilflowError(f"{path}: the header names column(s) {repeated} more than once; rename them")
        rows = []
        for cells in reader:
            if len(cells) > len(columns):
                raise DistilflowError(f"{path}: line {reader.line_num} has {len(cells)} cells but the header names "
                                      f"{len(columns)} columns ({delimiter!r}-separated); quote cells that hold "
                                      f"{delimiter!r}")
            if any(cell.strip() for cell in cells):
                rows.append(dict(zip(columns, cells + [""] * (len(columns) - len(cells)))))
    except csv.Error as err:
        raise DistilflowError(f"{path}: line {reader.line_num}: not {delimiter!r}-separated values ({err})") from None
    return rows


def _read_parquet(path: Path) -> list[dict]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        return pq.read_table(path).to_pylist()
    except (pa.ArrowException, OSError) as err:
        raise DistilflowError(f"{path}: not a readable Parquet file ({err})") from None


def _read_saved_dataset(path: Path, split: str | None) -> list[dict]:
    from datasets import DatasetDict, load_from_disk

    try:
        dataset = load_from_disk(str(path), keep_in_memory=True)
    except FileNotFoundError:
        raise DistilflowError(f"task.data: {path} is a directory but not a saved `datasets` dataset; "
                              f"use {FORMATS}") from None
    if isinstance(dataset, DatasetDict):
        if split is None and len(dataset) == 1:
            split = next(iter(dataset))
        if split not in dataset:
            raise DistilflowError(f"{path}: holds splits {list(dataset)}; set task.data_split to one of them")
    elif split is not None:
        raise DistilflowError(f"{path}: holds a single dataset, not splits; remove task.data_split")
    return (dataset[split] if split else dataset).to_list()


def _map_fields(row: dict, number: int, cfg: TaskConfig) -> dict:
    """The row with each template field read from its mapped column (``task.fields``)."""
    missing = sorted(f"{column} (task.fields.{name})" for name, column in cfg.fields.items() if column not in row)
    if missing:
        raise DistilflowError(f"{cfg.data}: example {number} has no column {', '.join(missing)}")
    return {**row, **{name: row[column] for name, column in cfg.fields.items()}}


def _check_rows(rows: list[dict], cfg: TaskConfig) -> None:
    needed = _template_fields(cfg.template)
    if cfg.label_field and not any(cfg.label_field in row for row in rows):
        columns = sorted({column for row in rows for column in row if isinstance(column, str)})
        close = difflib.get_close_matches(cfg.label_field, columns, n=1)
        raise DistilflowError(
            f"task.label_field: no example in {cfg.data} has a column {cfg.label_field!r} (columns: "
            f"{', '.join(columns)}{f'; did you mean {close[0]!r}?' if close else ''}); name the label column, or set "
            "task.label_field: null to have the teacher label every example")
    for number, row in enumerate(rows, start=1):
        missing = sorted(name for name in needed if row.get(name) is None or str(row[name]).strip() == "")
        if missing:
            raise DistilflowError(
                f"{cfg.data}: example {number} has no field {', '.join(missing)} (or it is empty) "
                "(task.template names it; map another column to it with task.fields)")
        for name in sorted(needed):
            if prompt_text(row[name]) is None:
                raise DistilflowError(
                    f"{cfg.data}: example {number}: field {name} is {row[name]!r} ({type(row[name]).__name__}), which "
                    "cannot go into a prompt (task.template names it); give it text, a number, a list or an object")
        answer = checks.label(row, cfg)
        problem = None if answer is None else checks.problem(answer, cfg)
        if answer is not None and cfg.check.type == "python":
            try:  # the user's function meets the answers of the run later: fail on what breaks it now
                checks.score(answer, row, cfg)
            except DistilflowError as err:
                raise DistilflowError(f"{cfg.data}: example {number}, scoring its label: {err}") from err.__cause__
        if problem:
            raise DistilflowError(f"{cfg.data}: example {number} has label {answer!r}, which task.check rejects: "
                                  f"{problem}; correct the example, or task.check if the label is right")


def prompt_text(value) -> str | None:
    """How a data value is written into a prompt: text as it is, a number as written, true/false, a list or an
    object as compact JSON; None for what has no faithful text (NaN, infinity, bytes, dates)."""
    if isinstance(value, str):
        return value
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, (bool, int, float, list, dict)):
        try:
            return json.dumps(value, ensure_ascii=False, allow_nan=False)
        except (TypeError, ValueError):
            return None
    return None


def _template_fields(template: str) -> set[str]:
    return {name for _, name, _, _ in string.Formatter().parse(template) if name}


def few_shot_examples(pool: list[dict], cfg: TaskConfig, k: int, seed: int) -> list[dict]:
    """k labelled examples of ``pool`` (seeded); for a choice task, cycling through the labels so each is shown."""
    rng = random.Random(seed)
    labelled = [r for r in pool if checks.label(r, cfg) is not None]
    if cfg.check.type != "choice":
        return rng.sample(labelled, min(k, len(labelled)))
    pools = [[r for r in labelled if checks.label(r, cfg) == choice] for choice in cfg.check.choices]
    shuffled = [rng.sample(pool, len(pool)) for pool in pools]
    shots = [shot for turn in zip_longest(*shuffled) for shot in turn if shot is not None][:k]
    return rng.sample(shots, len(shots))


def user_message(row: dict, cfg: TaskConfig) -> str:
    return cfg.template.format(**{name: prompt_text(row[name]) for name in _template_fields(cfg.template)})


def messages(row: dict, cfg: TaskConfig, shots: list[dict] = ()) -> list[dict]:
    """The chat a model answers for ``row``: system prompt, few-shot turns, then the input."""
    chat = [{"role": "system", "content": cfg.system_prompt}] if cfg.system_prompt else []
    for shot in shots:
        chat += [{"role": "user", "content": user_message(shot, cfg)},
                 {"role": "assistant", "content": checks.label(shot, cfg)}]
    return chat + [{"role": "user", "content": user_message(row, cfg)}]


def render(tokenizer, chat: list[dict]) -> str:
    """A chat as the model's own chat template writes it, ready for the assistant's answer."""
    return tokenizer.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)


def tokenized(tokenizer, texts: list[str], **options):
    """Text a chat template wrote, as token ids. The template already wrote any BOS the model expects, so the
    tokenizer adds none (one that adds its own, e.g. Llama 3's, would double it). ``options`` go to the
    tokenizer: padding, padding_side, truncation, max_length, return_tensors."""
    return tokenizer(texts, add_special_tokens=False, **options)


def calibration_texts(tokenizer, dataset, samples: int) -> list[str]:
    """A seeded sample of the task's prompts with their kept answers (the prototype's dataset), in the chat
    format the model serves: what scores layers, channels and heads for pruning and calibrates quantization."""
    rows = dataset.shuffle(seed=0).select(range(min(samples, len(dataset))))
    return [tokenizer.apply_chat_template(row["prompt"] + row["completion"], tokenize=False) for row in rows]


def token_batches(tokenizer, texts: list[str], device, batch_size: int = 8) -> list:
    """``texts``, ``tokenized``, in right-padded batches of tensors on ``device``."""
    return [tokenized(tokenizer, texts[i:i + batch_size], padding=True, padding_side="right",
                      return_tensors="pt").to(device) for i in range(0, len(texts), batch_size)]


# Content-free inputs for contextual calibration (Zhao et al. 2021, "Calibrate Before Use").
CONTENT_FREE_TEXTS = ("N/A", "", "[MASK]")


def content_free_rows(cfg: TaskConfig) -> list[dict]:
    """Rows whose every template field is a content-free text."""
    fields = _template_fields(cfg.template)
    return [{name: text for name in fields} for text in CONTENT_FREE_TEXTS]
