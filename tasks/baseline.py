"""The baseline a practitioner tries first on a choice task: TF-IDF features and logistic regression
(scikit-learn), trained in seconds on the labelled examples there are.

The journey shows it beside the teacher and the student (trained on the labelled pool, and on the teacher's
labels), so a user sees whether the LLM route paid off; ``deploy.gate.min_margin_over_baseline`` can refuse a
model that does not beat it. Its calibrated label probabilities can also join the teacher ensemble
(``prototype.ensemble.baseline``): the labelled pool's signal, in the student's soft labels. Its TF-IDF features
(``text_features``) also choose a teacher's demonstrations (``prototype.demonstrations: knn``).
"""

import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import Pipeline, make_pipeline

from distilflow.configs.schema import TaskConfig
from distilflow.tasks import data
from distilflow.tasks.text_features import features, texts
from distilflow.tasks.errors import DistilflowError
from distilflow.tasks.evaluate import Evaluation, Evaluator, score_answers
from distilflow.tasks.journey import JourneyEntry
from distilflow.tasks.serving import percentile

# Requests timed one at a time for the baseline's latency (it answers in milliseconds).
LATENCY_REQUESTS = 64
FILE = "baseline.skops"  # the one trained on the labelled pool, in the prototype's artifact


@dataclass
class Baseline:
    """A trained TF-IDF + logistic regression classifier over a choice task's labels."""

    pipeline: Pipeline
    trained_on: str  # what its labels were: "labelled pool", "teacher labels"
    examples: int

    def probabilities(self, rows: list[dict], task: TaskConfig) -> np.ndarray:
        """Each row's probability of every label, in ``task.check.choices`` order (0 for a label it never saw)."""
        known = list(self.pipeline.classes_)
        seen = self.pipeline.predict_proba(texts(rows, task))
        columns = [seen[:, known.index(c)] if c in known else np.zeros(len(rows)) for c in task.check.choices]
        return np.stack(columns, axis=1)

    def answers(self, rows: list[dict], task: TaskConfig) -> list[str]:
        return list(self.pipeline.predict(texts(rows, task)))


def cross_validated_probabilities(rows: list[dict], labels: list[str], task: TaskConfig) -> tuple[np.ndarray, list[int]]:
    """Each labelled row's probabilities from a baseline trained on the other folds (stratified, up to 5), so they
    can calibrate the baseline as the teacher's calibrate the teacher; and the rows they cover (all, or none where a
    label has a single example and no fold can hold it out)."""
    from sklearn.model_selection import StratifiedKFold, cross_val_predict

    folds = min(5, min(labels.count(label) for label in set(labels)))
    if folds < 2:
        return np.zeros((0, len(task.check.choices))), []
    model = trained(rows, labels, task, "labelled pool")
    seen = cross_val_predict(model.pipeline, texts(rows, task), labels, method="predict_proba",
                             cv=StratifiedKFold(folds, shuffle=True, random_state=0))
    known = list(model.pipeline.classes_)
    columns = [seen[:, known.index(c)] if c in known else np.zeros(len(rows)) for c in task.check.choices]
    return np.stack(columns, axis=1), list(range(len(rows)))


def trained(rows: list[dict], labels: list[str], task: TaskConfig, trained_on: str,
            weights: list[float] | None = None) -> Baseline:
    """TF-IDF of word 1-2 grams and character 2-5 grams (within words), then logistic regression, with
    scikit-learn's defaults: the classifier a practitioner writes in ten lines. ``weights``: how much each example
    counts (default: all alike)."""
    if len(set(labels)) < 2:
        raise DistilflowError(f"the TF-IDF baseline on the {trained_on} needs examples of at least two labels; it "
                              f"has {len(labels)} example(s) of {sorted(set(labels)) or 'none'}. Label more examples "
                              "(task.few_shot_pool), or set prototype.baseline: none (and leave it out of "
                              "prototype.ensemble)")
    pipeline = make_pipeline(features(), LogisticRegression(max_iter=1000))
    pipeline.fit(texts(rows, task), labels, logisticregression__sample_weight=weights)
    return Baseline(pipeline, trained_on, len(rows))


def evaluated(baseline: Baseline, rows: list[dict], task: TaskConfig, saved: Path) -> Evaluation:
    """The baseline on the held-out ``rows``, scored as every model is, with the size of its saved file."""
    evaluation = score_answers(baseline.answers(rows, task), rows, task, texts(rows, task))
    # Its size is the saved file's (vocabulary included); bits per parameter mean nothing for it.
    evaluation.metrics.update({"params": parameter_count(baseline.pipeline), "size_bytes": saved.stat().st_size})
    return evaluation


def journey_entry(baseline: Baseline, evaluator: Evaluator, saved: Path) -> JourneyEntry:
    """The baseline's journey row, served as it would be: in-process scikit-learn on one CPU thread, requests one at
    a time (latency) and all held-out requests as one batch (throughput)."""
    evaluation = evaluated(baseline, evaluator.rows, evaluator.task, saved)
    inputs = texts(evaluator.rows, evaluator.task)
    latencies = []
    for text in inputs[:LATENCY_REQUESTS]:
        start = time.perf_counter()
        baseline.pipeline.predict([text])
        latencies.append(time.perf_counter() - start)
    start = time.perf_counter()
    baseline.pipeline.predict(inputs)
    serving = {"engine": "scikit-learn", "device": "cpu", "artifact": saved.name, "artifact_bytes": saved.stat().st_size,
               "latency_p50_s": percentile(latencies, 50), "latency_p95_s": percentile(latencies, 95),
               "task_requests_per_s": len(inputs) / (time.perf_counter() - start), "threads": 1,
               "device_kind": "cpu", "examples": baseline.examples, "task_score": evaluation.metrics["task_score"]}
    return evaluation.journey_entry("baseline", trained_on=baseline.trained_on, serving=serving)


def card(entries: list[JourneyEntry], task: TaskConfig) -> str:
    """The data card's section on the baselines, the bar the student must clear besides the teacher's."""
    if task.check.type != "choice":
        return (f"## Baseline\n\nNot applicable: the TF-IDF + logistic regression baseline (prototype.baseline) "
                f"picks one of a choice task's labels; a {task.check.type} task's answers are not labels.\n")
    if not entries:
        return ""
    lines = ["## Baseline: TF-IDF + logistic regression", "",
             "What a practitioner tries first (scikit-learn's defaults on word 1-2 and character 2-5 grams), scored "
             "on the same held-out split:", "",
             "| trained on | task score | 95% CI | size (MB) | latency per request (ms, 1 CPU thread) |",
             "|---|---|---|---|---|"]
    lines += [f"| {e.trained_on} ({e.serving['examples']} examples) | {e.task_score:.3f} | {e.task_score_ci[0]:.3f}–{e.task_score_ci[1]:.3f} | "
              f"{e.size_bytes / 1e6:.2f} | {e.serving['latency_p50_s'] * 1e3:.1f} |" for e in entries]
    return "\n".join(lines) + "\n"


def parameter_count(pipeline: Pipeline) -> int:
    """The classifier's weights: one per (label, feature) and a bias per label."""
    classifier = pipeline[-1]
    return int(classifier.coef_.size + classifier.intercept_.size)


def save(baseline: Baseline, path: Path) -> Path:
    """The fitted pipeline as a skops file (safe to load: no pickle code runs)."""
    import skops.io

    skops.io.dump(baseline.pipeline, path)
    return path
