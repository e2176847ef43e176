"""The evaluator's confidence intervals: how sure a task score on the held-out split is, and where it shows."""

import pytest

from distilflow.configs.schema import PythonCheck
from distilflow.tasks import journey
from distilflow.tasks.evaluate import bootstrap_interval, score_answers, score_interval, wilson_interval
from distilflow.tasks.journey import JourneyEntry
from distilflow.tasks.tracking import numeric_metrics


def test_wilson_interval_of_an_accuracy_matches_the_textbook_values():
    # (p + z²/2n ± z·sqrt(p(1-p)/n + z²/4n²)) / (1 + z²/n), z = 1.96: worked by hand
    assert wilson_interval(280, 400) == pytest.approx([0.6534, 0.7428], abs=1e-4)
    assert wilson_interval(70, 80) == pytest.approx([0.7850, 0.9307], abs=1e-4)


def test_wilson_interval_stays_inside_zero_and_one_and_is_not_empty_at_the_ends():
    low, high = wilson_interval(400, 400)
    assert high == pytest.approx(1.0) and 0.99 < low < 1.0
    low, high = wilson_interval(0, 16)
    assert low == 0.0 and 0.15 < high < 0.25


def test_more_held_out_items_give_a_narrower_interval():
    narrow, wide = wilson_interval(280, 400), wilson_interval(56, 80)
    assert narrow[1] - narrow[0] < (wide[1] - wide[0]) / 2


def test_an_accuracy_gets_wilsons_interval_and_a_mean_score_a_seeded_bootstrap():
    assert score_interval([1.0] * 7 + [0.0] * 3) == wilson_interval(7, 10)
    partial = [0.5, 1.0, 0.25, 0.75, 1.0, 0.0, 0.6, 0.9] * 5
    low, high = score_interval(partial)
    assert low < sum(partial) / len(partial) < high
    assert score_interval(partial) == [low, high] == bootstrap_interval(partial)  # seeded: the same every time


def test_an_evaluation_carries_its_task_score_and_interval(tiny_cfg, tmp_path):
    rows = [{"text": str(i), "label": "bug"} for i in range(8)]
    evaluation = score_answers(["bug"] * 6 + ["payment"] * 2, rows, tiny_cfg.task, ["p"] * 8)
    assert evaluation.metrics["task_score"] == 0.75
    assert evaluation.metrics["task_score_ci"] == wilson_interval(6, 8)
    assert evaluation.journey_entry("student").task_score_ci == wilson_interval(6, 8)

    (tmp_path / "half.py").write_text("def half(answer, row):\n    return 0.5\n")
    check = PythonCheck.model_validate({"type": "python", "function": "half.py:half"}, context={"base_dir": tmp_path})
    partial = score_answers(["x"] * 8, rows, tiny_cfg.task.model_copy(update={"check": check}), ["p"] * 8)
    assert partial.metrics["task_score_ci"] == pytest.approx([0.5, 0.5])  # every score 0.5: no spread


def test_the_journey_table_shows_each_states_interval():
    states = [JourneyEntry("teacher", task_score=0.7, task_score_ci=[0.653, 0.743], perplexity=20.0, size_bytes=2e8,
                           params=1e8, bits_per_param=16.0, tokens_per_s=10.0),
              JourneyEntry("deployed", task_score=0.8)]
    lines = journey.table(states).splitlines()
    assert lines[0].startswith("| state | task score | 95% CI | retention |")
    assert lines[2].startswith("| teacher | 0.700 | 0.653–0.743 | 1.00 |")
    assert lines[3].startswith("| deployed | 0.800 | – | 1.14 |")


def test_mlflow_gets_an_interval_as_its_low_and_high_ends():
    assert numeric_metrics({"journey.deployed.task_score_ci": [0.6, 0.7], "task_score": 0.65, "note": "x",
                            "flag": True, "missing": None}) == \
        {"journey.deployed.task_score_ci_low": 0.6, "journey.deployed.task_score_ci_high": 0.7, "task_score": 0.65}
