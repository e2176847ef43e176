"""Stage 1, prototype: the teacher answers the task, its good answers become the training data,
and its score on the held-out split becomes the bar every later model is measured against."""

import json
import logging
import math
import statistics
import time
from collections import Counter
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
from datasets import Dataset
from tqdm.auto import tqdm

from distilflow.configs.schema import HttpTeacherConfig, ModelTrust, PrototypeConfig, TaskConfig
from distilflow.tasks import baseline, checks, data, decoding, ensemble, journey, package
from distilflow.tasks.artifacts import InArtifact, StageOutput
from distilflow.tasks.context import StageContext
from distilflow.tasks.data import TaskData
from distilflow.tasks.errors import DistilflowError
from distilflow.tasks.evaluate import Evaluation, Prompting, task_score
from distilflow.tasks.journey import JourneyEntry
from distilflow.tasks.judge import judge_filter, judge_scores
from distilflow.tasks.models import save_model, size_on_disk
from distilflow.tasks.teachers import FREE_TEXT, GUIDED_CHOICE, LOG_LIKELIHOOD, open_teacher

log = logging.getLogger("distilflow")

BUDGET_CHUNK = 64  # inputs answered between two looks at the clock, under prototype.time_budget_s


@dataclass(kw_only=True)
class ServedTeacher:
    """The prototype's HTTP teacher: its config, and what its server reported about the model it serves (logit KD
    asks it again, for its prompt log-probs)."""

    config: HttpTeacherConfig
    served: dict


@dataclass(kw_only=True)
class PrototypeOutput(StageOutput):
    """The distillation set and the bar every later model is measured against."""

    dataset: InArtifact  # a `datasets` Arrow dir in TRL's prompt-completion chat form (``write_dataset``)
    dataset_jsonl: InArtifact  # the same rows as JSON lines
    data_card: InArtifact
    teacher_eval: InArtifact  # the teacher's evaluation report on the held-out split
    few_shot: tuple[dict, ...]  # the examples the teacher answered with
    teacher: InArtifact | None  # its weights; None for a black-box (HTTP) teacher
    endpoint: ServedTeacher | None  # a black-box teacher's endpoint; None for a local one
    teacher_card: dict  # where the teacher came from and its license fields (``package.teacher_card``)
    baseline: InArtifact | None  # the TF-IDF baseline trained on the labelled pool (skops), where one was trained
    journey: list[JourneyEntry]  # the teacher's row, then the baselines' (prototype.baseline)

    @property
    def teacher_row(self) -> JourneyEntry:
        """The teacher's row of the journey: the bar every later model is measured against."""
        return self.journey[0]


def run(cfg: PrototypeConfig, ctx: StageContext) -> PrototypeOutput:
    task, out = ctx.evaluator.task, ctx.out_dir
    examples = data.load_task_data(task, ctx.seed)
    inputs = examples.train
    teacher = open_teacher(cfg.teacher, ctx.device)
    ranked, shot_scores = ranked_promptings(teacher, cfg, examples.pool, task, ctx.seed)
    prompting = ranked[0]
    teacher_eval = teacher.evaluate(ctx.evaluator, prompting)
    pool_baseline = baseline.trained(examples.pool, [checks.label(row, task) for row in examples.pool], task,
                                     journey.POOL) if wants_pool_baseline(cfg, task) else None
    answers, distributions = teacher_answers(teacher, inputs, task, prompting, cfg, ctx.seed)
    inputs = inputs[:len(answers)]  # all of them, or those the teacher labelled within prototype.time_budget_s
    ensemble_card = ""
    if cfg.ensemble:
        shot_sets = ranked[:cfg.ensemble.shot_sets]
        dev = [row for row in examples.pool if not any(row in asked.shots for asked in shot_sets
                                                       if not asked.nearest_of)]  # kNN never shows a row itself
        members = label_sources(teacher, teacher_eval, distributions, pool_baseline, inputs, examples.pool, dev,
                                shot_sets, cfg, ctx)
        rounds = []
        if cfg.ensemble.self_training_rounds:
            members, rounds = self_training(members, inputs, dev, cfg, ctx)
        combined = ensemble.mean(members)
        answers, distributions = ensemble_answers(combined, task, cfg, ctx.seed)
        ensemble_card = ensemble.card(members, combined, ctx.evaluator.rows, task) + \
            ensemble.rounds_card(rounds, len(dev), ctx.evaluator.rows, task)
        teacher_name = "ensemble of " + ", ".join(member.name for member in members)
    else:
        teacher_name = teacher.name
    kept, rejected = rejection_sample(inputs, answers, task, min_score=cfg.min_score, min_agreement=cfg.min_agreement,
                                      min_confidence=cfg.min_confidence, distributions=distributions)
    if cfg.keep_most_confident is not None:
        kept, less_confident = most_confident_per_label(kept, cfg.keep_most_confident)
        rejected += less_confident
    if cfg.judge:
        judge = teacher if cfg.judge.teacher is None else \
            open_teacher(cfg.judge.teacher, ctx.device, "prototype.judge.teacher")
        kept, judged_out = judge_filter(kept, judge_scores(judge, kept, task, cfg.judge), cfg.judge.threshold)
        rejected += judged_out
    if cfg.train_on_pool:
        kept += pool_rows(examples.pool, task)
    if not kept:
        raise DistilflowError(
            f"prototype: no teacher answer was kept ({', '.join(f'{r}: {n}' for r, n in rejected.items())} of "
            f"{len(inputs) * cfg.num_samples}); nothing to distill. Check task.check against the teacher's "
            "answers, or lower prototype.min_score / min_confidence / min_agreement / judge.threshold, or sample "
            "more (prototype.num_samples, prototype.temperature)")
    write_dataset(kept, task, teacher_name, cfg, out / "dataset", out / "dataset.jsonl", prompting)

    endpoint = None
    if not teacher.black_box:  # a black-box teacher has no weights to save: pruning and online KD need them
        save_model(teacher.model, teacher.tokenizer, out / "teacher")
        teacher_eval.add_size(size_on_disk(out / "teacher"))
    else:  # where offline logit KD asks for the served teacher's log-probs
        endpoint = ServedTeacher(config=cfg.teacher, served=teacher.served)
        (out / "teacher_endpoint.json").write_text(json.dumps(
            {"teacher": cfg.teacher.model_dump(mode="json"), "served": teacher.served}, indent=1))
    (out / "teacher_eval.json").write_text(json.dumps(teacher_eval.report(), indent=1))
    states = [teacher_eval.journey_entry("teacher")]
    if cfg.baseline != "none" and task.check.type == "choice":
        states += baseline_entries(pool_baseline, kept, task, ctx.evaluator, out)
    card = "\n".join(filter(None, [data_card(kept, rejected, examples, inputs, cfg, task, teacher), ensemble_card,
                                    teacher_score_card(teacher_eval, task), baseline.card(states[1:], task)]))
    (out / "data_card.md").write_text(card)
    teacher_card = package.teacher_card(cfg.teacher)
    (out / "teacher_card.json").write_text(json.dumps(teacher_card, indent=1))

    metrics = {"kept": len(kept), "rejected": sum(rejected.values()), "teacher.black_box": float(teacher.black_box),
               "data.duplicates_removed": examples.duplicates, "data.few_shot_pool": len(examples.pool),
               **shot_scores, **{f"rejected.{reason}": n for reason, n in rejected.items()},
               **answer_length_metrics(kept),
               **{f"teacher.{k}": v for k, v in teacher_eval.metrics.items() if v is not None}}
    ctx.tracker.log_metrics(metrics)
    ctx.tracker.set_tags({"distilflow.teacher": teacher.name,
                          "distilflow.teacher_access": "black-box" if teacher.black_box else "white-box",
                          **loading_tags(cfg)})
    for name in ("data_card.md", "dataset.jsonl", "teacher_eval.json"):
        ctx.tracker.log_artifact(out / name)
    return PrototypeOutput(
        dataset=out / "dataset", dataset_jsonl=out / "dataset.jsonl", data_card=out / "data_card.md",
        teacher_eval=out / "teacher_eval.json", few_shot=prompting.shots,
        teacher=None if teacher.black_box else out / "teacher", endpoint=endpoint, teacher_card=teacher_card,
        baseline=out / baseline.FILE if (out / baseline.FILE).exists() else None, journey=states, summary=card)


def wants_pool_baseline(cfg: PrototypeConfig, task: TaskConfig) -> bool:
    """The journey's baseline, or the ensemble's baseline member, is trained on the labelled pool."""
    return task.check.type == "choice" and (cfg.baseline != "none" or bool(cfg.ensemble and cfg.ensemble.baseline))


def label_sources(teacher, teacher_eval: Evaluation, distributions: list[dict[str, float]],
                  pool_baseline: "baseline.Baseline | None", inputs: list[dict], pool: list[dict], dev: list[dict],
                  shot_sets: list[Prompting], cfg: PrototypeConfig, ctx: StageContext) -> list[ensemble.Member]:
    """The ensemble's members (prototype.ensemble), each with its label probabilities on the training inputs, on
    the held-out split and on the ``dev`` rows (the pool rows no teacher sees as an example), calibrated on the
    labelled pool: the teacher with each of its ``shot_sets`` (the first is the one it already answered with), each
    further teacher (loaded, asked with the teacher's first few-shot examples, and let go before the next) and the
    baseline trained on the labelled pool (calibrated on its cross-validated probabilities, since it learned from
    the pool)."""
    task, choices = ctx.evaluator.task, ctx.evaluator.task.check.choices
    prompting = shot_sets[0]
    dev_labels = [choices.index(checks.label(row, task)) for row in dev]
    on_dev = label_probabilities(teacher, dev, task, prompting)
    members = [ensemble.Member(teacher.name, probability_rows(distributions, choices),
                               probability_rows(held_out_probabilities(teacher_eval), choices), on_dev)
               .calibrated(on_dev, dev_labels)]
    for index, asked in enumerate(shot_sets[1:], start=1):
        on_dev = label_probabilities(teacher, dev, task, asked)
        members.append(ensemble.Member(
            f"{teacher.name} (shot set {index + 1})",
            label_probabilities(teacher, inputs, task, asked, desc=f"teacher answering, shot set {index + 1}"),
            label_probabilities(teacher, ctx.evaluator.rows, task, asked, desc=f"teacher's score, shot set {index + 1}"),
            on_dev).calibrated(on_dev, dev_labels))
    for index, member_cfg in enumerate(cfg.ensemble.teachers):
        other = open_teacher(member_cfg, ctx.device, f"prototype.ensemble.teachers[{index}]")
        asked = replace(prompting, calibrate=cfg.calibrate and other.choice_method == LOG_LIKELIHOOD)
        on_inputs = label_probabilities(other, inputs, task, asked, desc=f"ensemble teacher {index} answering")
        held_out = held_out_probabilities(other.evaluate(ctx.evaluator, asked, desc=f"ensemble teacher {index}"))
        on_dev = label_probabilities(other, dev, task, asked)
        members.append(ensemble.Member(other.name, on_inputs, probability_rows(held_out, choices), on_dev)
                       .calibrated(on_dev, dev_labels))
        del other
    if cfg.ensemble.baseline:
        folds, covered = baseline.cross_validated_probabilities(pool, [checks.label(row, task) for row in pool], task)
        # on the dev rows, its probabilities from the folds that did not learn them (where there are folds)
        on_dev = folds[[pool.index(row) for row in dev]] if covered else pool_baseline.probabilities(dev, task)
        members.append(ensemble.Member(f"baseline ({journey.POOL})", pool_baseline.probabilities(inputs, task),
                                       pool_baseline.probabilities(ctx.evaluator.rows, task), on_dev).calibrated(
            folds, [choices.index(checks.label(pool[i], task)) for i in covered]))
    for member, weight in zip(members, cfg.ensemble.weights or [1.0] * len(members)):
        member.weight = weight
    return members


def self_training(members: list[ensemble.Member], inputs: list[dict], dev: list[dict], cfg: PrototypeConfig,
                  ctx: StageContext) -> tuple[list[ensemble.Member], list[ensemble.Round]]:
    """prototype.ensemble.self_training_rounds: each round the TF-IDF baseline learns the ensemble's labels of the
    training inputs (each weighted by the ensemble's probability of it, so unsure labels count less), never the pool,
    so the pool's ``dev`` rows judge it fairly (preflight makes sure there are some); it is calibrated on them and
    replaces the baseline member."""
    task, choices = ctx.evaluator.task, ctx.evaluator.task.check.choices
    dev_labels = [choices.index(checks.label(row, task)) for row in dev]

    def retrained(combined: ensemble.Member, number: int) -> ensemble.Member:
        model = baseline.trained(inputs, [choices[i] for i in combined.inputs.argmax(1)], task,
                                 f"self-training round {number}", weights=combined.inputs.max(1).tolist())
        on_dev = model.probabilities(dev, task)
        return ensemble.Member(f"baseline (self-training round {number})", model.probabilities(inputs, task),
                               model.probabilities(ctx.evaluator.rows, task), on_dev).calibrated(on_dev, dev_labels)

    return ensemble.self_trained(members, retrained, dev_labels, cfg.ensemble.self_training_rounds,
                                 replaces_last=cfg.ensemble.baseline)


def label_probabilities(teacher, rows: list[dict], task: TaskConfig, prompting: Prompting,
                        desc: str | None = None) -> np.ndarray:
    """The teacher's calibrated probability of each label (rows x labels), as it answers ``rows``."""
    if not rows:
        return np.zeros((0, len(task.check.choices)))
    return teacher.choice_scores(rows, task, prompting, desc=desc).softmax(1).numpy()


def held_out_probabilities(evaluation: Evaluation) -> list[dict[str, float]]:
    return [prediction["probabilities"] for prediction in evaluation.predictions]


def probability_rows(distributions: list[dict[str, float]], choices: list[str]) -> np.ndarray:
    return np.array([[distribution[choice] for choice in choices] for distribution in distributions])


def ensemble_answers(combined: ensemble.Member, task: TaskConfig, cfg: PrototypeConfig,
                     seed: int) -> tuple[list[list[str]], list[dict[str, float]]]:
    """The ensemble's answers (its most likely label, or samples of its distribution) and its label probabilities,
    as ``teacher_answers`` gives a single teacher's."""
    scores = torch.from_numpy(np.log(np.clip(combined.inputs, 1e-12, None)))
    answers = decoding.pick(scores, task.check.choices, temperature=cfg.temperature, num_samples=cfg.num_samples,
                            seed=seed)
    return answers, [dict(zip(task.check.choices, row)) for row in combined.inputs.tolist()]


def baseline_entries(pool_baseline: "baseline.Baseline", kept: list[dict], task: TaskConfig, evaluator,
                     out: Path) -> list[JourneyEntry]:
    """The journey's baseline rows: TF-IDF + logistic regression trained on the labelled pool, and on the labels
    the student learns from (the kept answers), each scored on the held-out split and timed per request."""
    on_kept = baseline.trained([k["row"] for k in kept], [k["answer"] for k in kept], task, "distillation labels")
    baseline.save(on_kept, out / "baseline-distillation-labels.skops")
    return [baseline.journey_entry(model, evaluator, saved)
            for model, saved in ((pool_baseline, baseline.save(pool_baseline, out / baseline.FILE)),
                                 (on_kept, out / "baseline-distillation-labels.skops"))]


def loading_tags(cfg: PrototypeConfig) -> dict[str, str]:
    """What the loaded models' files were allowed to run (pickle, repository code), for the run's record."""
    loaded = {"teacher": cfg.teacher, "judge": cfg.judge and cfg.judge.teacher}
    return {f"distilflow.{role}.{choice}": str(getattr(model, choice)).lower()
            for role, model in loaded.items() if isinstance(model, ModelTrust)
            for choice in ("allow_pickle", "trust_remote_code")}


def ranked_promptings(teacher, cfg: PrototypeConfig, pool: list[dict], task: TaskConfig,
                      seed: int) -> tuple[list[Prompting], dict]:
    """The ``cfg.shot_candidates`` seeded few-shot sets, the one the teacher answers best with first.

    A small teacher's score swings with its examples (0.53 to 0.73 across four draws for the
    embedded one), so candidates are scored on examples of the labelled pool (never the held-out
    split) that are not among their own shots; ties keep the draws' order. Calibration needs the teacher's
    log-likelihoods: a served teacher that chooses by its guided choice is never calibrated. With kNN
    demonstrations the best set stays what a served copy of the teacher is asked with (deploy), and each input is
    shown its own nearest pool examples.
    """
    calibrate = cfg.calibrate and teacher.choice_method == LOG_LIKELIHOOD
    candidates = [Prompting(tuple(data.few_shot_examples(pool, task, cfg.few_shot, seed + i)), calibrate)
                  for i in range(cfg.shot_candidates)]
    scores = {}
    if len(candidates) > 1:
        for i, candidate in enumerate(tqdm(candidates, desc="choosing few-shot examples")):
            dev = [row for row in pool if row not in candidate.shots][:cfg.shot_dev_size]
            answers = [a[0] for a in teacher.answer(dev, task, candidate)]
            scores[f"shot_set_{i}.dev_score"] = task_score(answers, dev, task)
        order = sorted(range(len(candidates)), key=lambda i: -scores[f"shot_set_{i}.dev_score"])
        candidates, scores = [candidates[i] for i in order], {**scores, "shot_set.chosen": order[0]}
    if cfg.demonstrations == "knn":
        candidates[0] = replace(candidates[0], nearest_of=tuple(pool))
    return candidates, scores


def teacher_answers(teacher, inputs: list[dict], task: TaskConfig, prompting: Prompting, cfg: PrototypeConfig,
                    seed: int) -> tuple[list[list[str]], list[dict[str, float]] | None]:
    """``cfg.num_samples`` answers per input and, for a choice task on a teacher that scores labels (its
    weights, or a server's prompt log-probs), the teacher's calibrated probability of every label per input:
    the soft labels of logit KD, and at the answer kept, the teacher's confidence in it. Sampled answers are
    drawn from those same probabilities.

    With ``cfg.time_budget_s`` the inputs are answered ``BUDGET_CHUNK`` at a time until the budget is spent: the
    answers then cover the first inputs only, as many as the teacher labelled in time."""
    if cfg.time_budget_s is None:
        return answers_of(teacher, inputs, task, prompting, cfg, seed)
    answers, distributions, start = [], [], time.perf_counter()
    for index in range(0, len(inputs), BUDGET_CHUNK):
        if answers and time.perf_counter() - start > cfg.time_budget_s:
            log.info("prototype.time_budget_s (%g s) spent: the teacher labelled %d of %d inputs", cfg.time_budget_s,
                     len(answers), len(inputs))
            break
        chunk_answers, chunk_distributions = answers_of(teacher, inputs[index:index + BUDGET_CHUNK], task, prompting,
                                                        cfg, seed + index)
        answers += chunk_answers
        distributions += chunk_distributions or []
    return answers, distributions or None


def answers_of(teacher, inputs: list[dict], task: TaskConfig, prompting: Prompting, cfg: PrototypeConfig,
               seed: int) -> tuple[list[list[str]], list[dict[str, float]] | None]:
    sampling = {"temperature": cfg.temperature, "num_samples": cfg.num_samples, "seed": seed}
    if task.check.type != "choice" or teacher.choice_method != LOG_LIKELIHOOD:
        return teacher.answer(inputs, task, prompting, desc="teacher answering", **sampling), None
    scores = teacher.choice_scores(inputs, task, prompting, desc="teacher answering")
    probabilities = [dict(zip(task.check.choices, row)) for row in scores.softmax(1).tolist()]
    return decoding.pick(scores, task.check.choices, **sampling), probabilities


def require_label_probabilities(keys: list[str], teacher, cfg: PrototypeConfig) -> None:
    """``keys`` (the confidence filters, soft-label KD) read the teacher's probability of each label, which a served
    teacher gives only when its server returns prompt log-probs (found when it connects: without them, its labels
    are guided choices). Preflight asks, before any stage."""
    if keys and teacher.choice_method != LOG_LIKELIHOOD:
        raise DistilflowError(f"{keys[0]} reads the teacher's probability of each label, but {teacher.name} gives "
                              f"none ({choice_method(teacher, cfg)}): serve it with prompt log-probs (vLLM), or "
                              f"unset {keys[0]}")


# Why an answer left the distillation set, and the setting that decided it (the data card's table).
REASONS = {
    "invalid": "task.check: not a valid answer",
    "wrong_label": "prototype.min_score: scored against the data's label",
    "low_score": "prototype.min_score",
    "low_agreement": "prototype.min_agreement: samples of the input disagree",
    "outvoted": "prototype.min_agreement: not the input's majority answer",
    "duplicate": "the input's answer was kept already",
    "low_confidence": "prototype.min_confidence: the teacher's probability of its answer",
    "less_confident": "prototype.keep_most_confident: not among the most confident answers with this label",
    "judge_low_score": "prototype.judge.threshold",
    "judge_unparsed": "prototype.judge: no score in the judge's reply",
}


def rejection_sample(rows: list[dict], answers: list[list[str]], task: TaskConfig, *, min_score: float = 1.0,
                     min_agreement: float | None = None, min_confidence: float | None = None,
                     distributions: list[dict[str, float]] | None = None) -> tuple[list[dict], Counter]:
    """Keep each valid, good enough (by the check, against the label where there is one), not yet seen
    answer, with its score; count the rest by reason (``REASONS``).

    Two filters need no label: with ``min_agreement`` only an input's majority answer is a candidate, and
    only where that share of its samples agree (self-consistency); with ``min_confidence`` only answers the
    teacher gives at least that probability (``distributions``, one per input) are kept.
    """
    kept, rejected, seen = [], Counter(), set()
    for index, (row, samples) in enumerate(zip(rows, answers)):
        samples = [checks.canonical(answer, task) for answer in samples]  # JSON answers vote and are kept as JSON
        valid = [answer for answer in samples if checks.is_valid(answer, task)]
        if len(valid) < len(samples):
            rejected["invalid"] += len(samples) - len(valid)
        agreement = None
        if min_agreement is not None and valid:
            majority, votes = Counter(valid).most_common(1)[0]
            agreement = votes / len(samples)
            if agreement < min_agreement:
                rejected["low_agreement"] += len(valid)
                continue
            rejected["outvoted"] += len(valid) - votes
        for sample, answer in enumerate(samples):
            if answer not in valid or (agreement is not None and answer != majority):
                continue
            key = (data.user_message(row, task), answer)
            score = checks.score(answer, row, task)
            confidence = distributions[index][answer] if distributions else None
            if score < min_score:
                rejected["wrong_label" if checks.label(row, task) is not None else "low_score"] += 1
            elif key in seen:
                rejected["duplicate"] += 1
            elif min_confidence is not None and confidence < min_confidence:
                rejected["low_confidence"] += 1
            else:
                seen.add(key)
                kept.append({"row": row, "answer": answer, "score": score, "input_index": index, "sample": sample,
                             "confidence": confidence, "agreement": agreement,
                             "choice_probs": distributions[index] if distributions else None})
    return kept, rejected


def most_confident_per_label(kept: list[dict], share: float) -> tuple[list[dict], Counter]:
    """For each answer the teacher gave, the ``share`` of its kept rows it was most confident in (at least
    one), in their original order; the rest counted as ``less_confident``."""
    by_answer: dict[str, list[dict]] = {}
    for item in kept:
        by_answer.setdefault(item["answer"], []).append(item)
    chosen = {id(item) for items in by_answer.values()
              for item in sorted(items, key=lambda k: -k["confidence"])[:max(1, math.ceil(share * len(items)))]}
    dropped = len(kept) - len(chosen)
    return [item for item in kept if id(item) in chosen], Counter(less_confident=dropped) if dropped else Counter()


def write_dataset(kept: list[dict], task: TaskConfig, teacher: str, cfg: PrototypeConfig,
                  directory: Path, jsonl: Path, prompting: Prompting = Prompting()) -> None:
    """The distillation set, as a `datasets` Arrow dir plus JSONL, in TRL's prompt-completion chat form,
    with each answer's score and provenance (teacher, the chat it answered with its few-shot examples,
    input, sample, temperature, label source), the teacher's confidence and the samples' agreement where
    measured, and for a choice task the teacher's probability of every label (``choice_probs``, the soft
    labels of ``logit_kd.teacher_logits: choices``)."""
    teacher_prompts = prompting.chats([k["row"] for k in kept], task)
    records = [{"prompt": data.messages(k["row"], task), "completion": [{"role": "assistant", "content": k["answer"]}],
                "teacher_prompt": teacher_prompt,
                "answer": k["answer"], "label": checks.label(k["row"], task) or "",
                "label_source": label_source(k, task),
                "score": k["score"], **({"judge_score": k["judge_score"]} if cfg.judge else {}),
                **{name: k[name] for name in ("confidence", "agreement", "choice_probs") if k[name] is not None},
                "source": "teacher", "teacher": teacher, "input_index": k["input_index"], "sample": k["sample"],
                "temperature": cfg.temperature}
               for k, teacher_prompt in zip(kept, teacher_prompts)]
    Dataset.from_list(records).save_to_disk(directory)
    jsonl.write_text("".join(json.dumps(r) + "\n" for r in records))


def label_source(kept: dict, task: TaskConfig) -> str:
    """Where a kept answer's label came from: `gold` (the labelled pool, prototype.train_on_pool), `data` (a training
    input's own label, which filtered the teacher's answer), or `teacher` (the teacher's, or the ensemble's)."""
    return kept.get("label_source") or ("data" if checks.label(kept["row"], task) is not None else "teacher")


def pool_rows(pool: list[dict], task: TaskConfig) -> list[dict]:
    """The labelled pool as kept answers with their own labels (prototype.train_on_pool)."""
    choices = task.check.choices if task.check.type == "choice" else None
    return [{"row": row, "answer": checks.label(row, task), "score": 1.0, "input_index": None, "sample": 0,
             "confidence": None, "agreement": None, "label_source": "gold",
             "choice_probs": {c: float(c == checks.label(row, task)) for c in choices} if choices else None}
            for row in pool]


def answer_length_metrics(kept: list[dict]) -> dict[str, float]:
    lengths = [len(k["answer"]) for k in kept]
    if not lengths:
        return {}
    return {"answer_chars.min": min(lengths), "answer_chars.mean": statistics.fmean(lengths),
            "answer_chars.max": max(lengths)}


def data_card(kept: list[dict], rejected: Counter, examples: TaskData, inputs: list[dict], cfg: PrototypeConfig,
              task: TaskConfig, teacher) -> str:
    """What the distillation set holds and what was thrown away, as markdown (MLflow, Prefect, model card).
    ``inputs``: the training inputs the teacher answered (all of ``examples.train``, or those within its budget)."""
    total = len(inputs) * cfg.num_samples
    labelled = sum(checks.label(row, task) is not None for row in inputs)
    access = "black-box (served: no weights, so no student pruned from it)" \
        if teacher.black_box else "white-box (weights saved with this stage)"
    sources = Counter(label_source(k, task) for k in kept)
    lines = ["## Data card", "",
             f"Teacher: `{teacher.name}`, {access}.", "",
             *([f"Labels chosen by {choice_method(teacher, cfg)}.", ""] if task.check.type == "choice" else []),
             f"Few-shot examples: {demonstrations(cfg)}.", "",
             f"Split: {len(examples.eval)} held-out, {len(examples.pool)} in the labelled few-shot pool, "
             f"{len(inputs)} training inputs; {examples.duplicates} rows dropped before the split as duplicate inputs "
             "(no held-out input is a training input or a few-shot example).", "",
             f"Inputs: {len(inputs)} ({labelled} labelled, {len(inputs) - labelled} labelled by the "
             f"{'ensemble' if cfg.ensemble else 'teacher'}"
             f"{f'; {len(examples.train)} were there, prototype.time_budget_s let it label these' if len(inputs) < len(examples.train) else ''}); "
             f"{cfg.num_samples} answer(s) each at temperature {cfg.temperature}: {total} answers. "
             f"Check: {task.check.type}, {checks.describe(task)}.", "",
             f"**Kept {len(kept)}** (label source: {', '.join(f'{s} {n}' for s, n in sorted(sources.items()))}), "
             f"rejected {sum(rejected.values())}.", "",
             "| rejected because | setting | count |", "|---|---|---|"]
    lines += [f"| {reason} | {REASONS.get(reason, '')} | {n} |" for reason, n in sorted(rejected.items())] \
        or ["| (none) | | 0 |"]
    answers = Counter(k["answer"] for k in kept)
    lines += ["", f"| kept answer ({len(answers)} distinct, top 10) | count |", "|---|---|"]
    lines += [f"| {_cell(answer)} | {n} |" for answer, n in answers.most_common(10)]
    lengths = [len(k["answer"]) for k in kept]
    if lengths:
        lines += ["", f"Answer length in characters: min {min(lengths)}, median {statistics.median(lengths):g}, "
                      f"mean {statistics.fmean(lengths):.1f}, max {max(lengths)}."]
    confidences = [k["confidence"] for k in kept if k["confidence"] is not None]
    if confidences:
        lines += ["", f"{'The ensemble' if cfg.ensemble else 'Teacher'}'s probability of its kept answers: mean "
                      f"{statistics.fmean(confidences):.2f}, "
                      f"min {min(confidences):.2f}"
                      + (f" (prototype.min_confidence {cfg.min_confidence:g})." if cfg.min_confidence else ".")
                      + (f" The most confident {cfg.keep_most_confident:.0%} of each label's answers kept "
                         "(prototype.keep_most_confident)." if cfg.keep_most_confident else "")]
    if cfg.min_agreement is not None:
        lines += ["", f"Self-consistency: an input's majority answer is kept when at least {cfg.min_agreement:g} of "
                      f"its {cfg.num_samples} samples agree."]
    if cfg.judge:
        judged = [k["judge_score"] for k in kept]
        mean = f"{statistics.fmean(judged):.2f}" if judged else "–"
        lines += ["", f"Judge (`{'teacher' if cfg.judge.teacher is None else 'separate model'}`): kept answers "
                      f"scored {mean} on average (1..5); threshold {cfg.judge.threshold:g}."]
    return "\n".join(lines) + "\n"


def demonstrations(cfg: PrototypeConfig) -> str:
    """Which examples the teacher saw, for the data card."""
    if cfg.demonstrations == "knn":
        return (f"each input's {cfg.few_shot} most similar examples of the labelled pool by TF-IDF cosine "
                "(prototype.demonstrations: knn; a served copy of the teacher is asked with the best fixed set)")
    sets = cfg.ensemble.shot_sets if cfg.ensemble else 1
    return f"the best {sets} of {cfg.shot_candidates} fixed set(s) of {cfg.few_shot}" if sets > 1 else \
        f"one fixed set of {cfg.few_shot} for every input (the best of {cfg.shot_candidates})"


def choice_method(teacher, cfg: PrototypeConfig) -> str:
    """How the teacher answered a choice task, for the data card."""
    if teacher.choice_method != LOG_LIKELIHOOD:
        return {GUIDED_CHOICE: "the server's guided choice (labels spelled from sub-word pieces, not calibrated)",
                FREE_TEXT: "free text from the server, filtered by the check"}[teacher.choice_method]
    source = "the server's prompt log-probs" if teacher.black_box else "the teacher's logits"
    return f"each label's full log-likelihood from {source}" + (", calibrated" if cfg.calibrate else "")


def teacher_score_card(evaluation: Evaluation, task: TaskConfig) -> str:
    """The teacher's score on the held-out split: the bar for every later model."""
    lines = ["## Teacher's score", "",
             f"Task score ({task.check.metric}) on {len(evaluation.predictions)} held-out examples: "
             f"**{evaluation.metrics['task_score']:.3f}**"]
    if evaluation.per_class:
        lines += ["", "| class | accuracy |", "|---|---|"]
        lines += [f"| {label} | {score:.3f} |" for label, score in evaluation.per_class.items()]
    return "\n".join(lines) + "\n"


def _cell(text: str, width: int = 60) -> str:
    """An answer inside a markdown table cell: one line, pipes escaped, shortened."""
    flat = " ".join(text.split()).replace("|", "\\|")
    return flat if len(flat) <= width else flat[:width - 1] + "…"
