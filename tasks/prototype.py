"""Stage 1, prototype: the teacher answers the task, its good answers become the training data,
and its score on the held-out split becomes the bar every later model is measured against."""

import json
from collections import Counter
from pathlib import Path

from datasets import Dataset
from tqdm.auto import tqdm

from distilflow.configs.schema import PrototypeConfig, TaskConfig
from distilflow.tasks import checks, data, package
from distilflow.tasks.artifacts import StageResult
from distilflow.tasks.context import StageContext
from distilflow.tasks.evaluate import Prompting, evaluate, task_score
from distilflow.tasks.models import load_teacher, save_model, size_on_disk


def run(cfg: PrototypeConfig, upstream: dict[str, StageResult], ctx: StageContext) -> StageResult:
    teacher, tokenizer = load_teacher(cfg.teacher, ctx.device)
    task, out, pool = ctx.task, ctx.out_dir, ctx.examples.train
    prompting, shot_scores = choose_prompting(teacher, tokenizer, cfg, ctx)
    answers = prompting.choose(teacher, tokenizer, pool, task, temperature=cfg.temperature,
                               num_samples=cfg.num_samples, seed=ctx.seed, desc="teacher answering")
    kept, rejected = rejection_sample(pool, answers, task)
    write_dataset(kept, task, out / "dataset", out / "dataset.jsonl")
    card = data_card(kept, rejected, len(pool) * cfg.num_samples)
    (out / "data_card.md").write_text(card)

    baseline = evaluate(teacher, tokenizer, ctx.examples.eval, task, ctx.eval, prompting=prompting,
                        desc="teacher baseline")
    save_model(teacher, tokenizer, out / "teacher")
    baseline.add_size(size_on_disk(out / "teacher"))
    (out / "teacher_eval.json").write_text(json.dumps(baseline.report(), indent=1))
    (out / "few_shot.json").write_text(json.dumps(list(prompting.shots), indent=1))
    (out / "teacher_card.json").write_text(json.dumps(package.teacher_card(cfg.teacher), indent=1))

    metrics = {"kept": len(kept), "rejected": sum(rejected.values()), **shot_scores,
               **{f"rejected.{reason}": n for reason, n in rejected.items()},
               **{f"teacher.{k}": v for k, v in baseline.metrics.items()}}
    ctx.tracker.log_metrics(metrics)
    for name in ("data_card.md", "dataset.jsonl", "teacher_eval.json"):
        ctx.tracker.log_artifact(out / name)
    return StageResult(stage="prototype",
                       files={"dataset": "dataset", "dataset_jsonl": "dataset.jsonl", "teacher": "teacher",
                              "data_card": "data_card.md", "teacher_card": "teacher_card.json"},
                       metrics=metrics, journey=[baseline.journey_entry("teacher")], summary=card)


def choose_prompting(teacher, tokenizer, cfg: PrototypeConfig, ctx: StageContext) -> tuple[Prompting, dict]:
    """The few-shot set the teacher answers best with, among ``cfg.shot_candidates`` seeded draws.

    A small teacher's score swings with its examples (0.53 to 0.73 across four draws for the
    embedded one), so candidates are scored on labelled training examples (never the held-out
    split) that are not among their own shots.
    """
    task, train = ctx.task, ctx.examples.train
    candidates = [Prompting(tuple(data.few_shot_examples(train, task, cfg.few_shot, ctx.seed + i)), cfg.calibrate)
                  for i in range(cfg.shot_candidates)]
    if len(candidates) == 1:
        return candidates[0], {}
    labelled = [row for row in train if data.label(row, task) is not None]
    scores = {}
    for i, candidate in enumerate(tqdm(candidates, desc="choosing few-shot examples")):
        dev = [row for row in labelled if row not in candidate.shots][:cfg.shot_dev_size]
        answers = [a[0] for a in candidate.choose(teacher, tokenizer, dev, task)]
        scores[f"shot_set_{i}.dev_score"] = task_score(answers, dev, task)
    best = max(range(len(candidates)), key=lambda i: scores[f"shot_set_{i}.dev_score"])
    return candidates[best], {**scores, "shot_set.chosen": best}


def rejection_sample(rows: list[dict], answers: list[list[str]], task: TaskConfig) -> tuple[list[dict], Counter]:
    """Keep each valid, correct (where labelled), not yet seen answer; count the rest by reason."""
    kept, rejected, seen = [], Counter(), set()
    for row, samples in zip(rows, answers):
        for answer in samples:
            key = (task.template.format(**row), answer)
            if not checks.is_valid(answer, task):
                rejected["invalid"] += 1
            elif checks.score(answer, row, task) < 1.0:
                rejected["wrong_label"] += 1
            elif key in seen:
                rejected["duplicate"] += 1
            else:
                seen.add(key)
                kept.append({"row": row, "answer": answer})
    return kept, rejected


def write_dataset(kept: list[dict], task: TaskConfig, directory: Path, jsonl: Path) -> None:
    """The distillation set, as a `datasets` Arrow dir plus JSONL, in TRL's prompt-completion chat form."""
    records = [{"prompt": data.messages(k["row"], task), "completion": [{"role": "assistant", "content": k["answer"]}],
                "answer": k["answer"], "label": data.label(k["row"], task) or "", "source": "teacher"}
               for k in kept]
    Dataset.from_list(records).save_to_disk(directory)
    jsonl.write_text("".join(json.dumps(r) + "\n" for r in records))


def data_card(kept: list[dict], rejected: Counter, total: int) -> str:
    labels = Counter(k["answer"] for k in kept)
    lines = ["## Data card", "", f"Teacher answers: {total}; kept {len(kept)}; rejected {sum(rejected.values())}", "",
             "| rejected because | count |", "|---|---|"]
    lines += [f"| {reason} | {n} |" for reason, n in sorted(rejected.items())] or ["| (none) | 0 |"]
    lines += ["", "| kept label | count |", "|---|---|"] + [f"| {label} | {n} |" for label, n in sorted(labels.items())]
    return "\n".join(lines) + "\n"
