"""The TF-IDF + logistic regression baseline: trained on labelled rows, scored by the shared evaluator."""

import pytest
import torch

from distilflow.configs.schema import EvalConfig
from distilflow.tasks import baseline, text_features
from distilflow.tasks.evaluate import Evaluator
from distilflow.tasks.data import load_task_data
from distilflow.tasks.errors import DistilflowError


@pytest.fixture
def examples(tiny_cfg):
    return tiny_cfg.task, load_task_data(tiny_cfg.task.model_copy(update={"few_shot_pool": 64, "eval_size": 200}), 0)


def test_baseline_trained_on_the_labelled_pool_beats_chance_on_held_out_and_is_a_journey_row(examples, tmp_path):
    task, data = examples
    model = baseline.trained(data.pool, [row["label"] for row in data.pool], task, "labelled pool")
    saved = baseline.save(model, tmp_path / "baseline.skops")
    row = baseline.journey_entry(model, Evaluator(task, data.eval, EvalConfig(), torch.device("cpu")), saved)
    assert row.task_score > 0.5  # four labels: chance is 0.25
    low, high = row.task_score_ci
    assert low < row.task_score < high
    assert (row.state, row.trained_on, row.size_bytes) == ("baseline", "labelled pool", saved.stat().st_size)
    assert row.serving["engine"] == "scikit-learn" and row.serving["task_score"] == row.task_score
    assert 0 < row.serving["latency_p50_s"] <= row.serving["latency_p95_s"] and row.serving["task_requests_per_s"] > 0


def test_baseline_probabilities_follow_the_tasks_label_order_with_zero_for_unseen_labels(examples):
    task, data = examples
    two_labels = [row for row in data.pool if row["label"] in ("bug", "payment")]
    model = baseline.trained(two_labels, [row["label"] for row in two_labels], task, "labelled pool")
    probabilities = model.probabilities(data.eval[:5], task)
    assert probabilities.shape == (5, len(task.check.choices))
    unseen = [task.check.choices.index(label) for label in ("delivery", "account")]
    assert (probabilities[:, unseen] == 0).all()
    assert probabilities.sum(1) == pytest.approx([1.0] * 5)


def test_baseline_with_one_label_names_what_to_label(examples):
    task, data = examples
    one_label = [row for row in data.pool if row["label"] == "bug"]
    with pytest.raises(DistilflowError, match="at least two labels.*few_shot_pool"):
        baseline.trained(one_label, ["bug"] * len(one_label), task, "labelled pool")


def test_nearest_pool_examples_are_the_most_similar_by_tfidf_cosine_the_most_similar_last(tiny_cfg):
    task = tiny_cfg.task
    pool = [{"text": "I was charged twice for my order", "label": "payment"},
            {"text": "the app crashes when I open settings", "label": "bug"},
            {"text": "my parcel never arrived", "label": "delivery"},
            {"text": "charged twice on my card, please refund", "label": "payment"}]
    [shots] = text_features.nearest(pool, [{"text": "I was charged twice, refund my card"}], 2, task)
    assert [shot["text"] for shot in shots] == ["I was charged twice for my order",
                                                 "charged twice on my card, please refund"]


def test_a_pool_row_is_never_its_own_nearest_example(examples):
    task, data = examples
    neighbours = text_features.nearest(data.pool, data.pool[:10], 4, task)
    assert all(len(shots) == 4 and row not in shots for row, shots in zip(data.pool, neighbours))
