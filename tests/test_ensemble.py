"""Teacher ensembles: several label sources averaged into one soft label per input."""

import numpy as np
import pytest
from datasets import load_from_disk

from distilflow.configs.schema import EnsembleConfig
from distilflow.tasks import ensemble
from distilflow.tasks.data import load_task_data
from distilflow.flows.cli import main
from distilflow.tasks.stages import run_stage
from tests.conftest import TINY_CONFIG, TINY_TEACHER, free_port


def member(name, held_out, weight=1.0):
    return ensemble.Member(name, inputs=np.array(held_out), held_out=np.array(held_out), dev=np.array(held_out),
                           weight=weight)


def test_ensemble_is_the_weighted_mean_of_its_members():
    teacher = member("teacher", [[0.9, 0.1], [0.4, 0.6]], weight=1.0)
    baseline = member("baseline", [[0.1, 0.9], [0.0, 1.0]], weight=3.0)
    combined = ensemble.mean([teacher, baseline])
    assert combined.inputs == pytest.approx(np.array([[0.3, 0.7], [0.1, 0.9]]))


def test_members_that_disagree_can_make_a_right_answer_neither_makes_alone(tiny_cfg):
    task = tiny_cfg.task.model_copy(update={"check": tiny_cfg.task.check.model_copy(update={"choices": ["a", "b", "c"]})})
    rows = [{"text": "x", "label": "c"}]
    first, second = member("first", [[0.5, 0.0, 0.45]]), member("second", [[0.0, 0.5, 0.45]])
    combined = ensemble.mean([first, second])
    assert [ensemble.held_out_score(m.held_out, rows, task)[0] for m in (first, second, combined)] == [0.0, 0.0, 1.0]


def test_prototype_with_the_baseline_in_its_ensemble_labels_with_both_and_cards_each(tiny_cfg):
    cfg = tiny_cfg.model_copy(update={"prototype": tiny_cfg.prototype.model_copy(
        update={"ensemble": EnsembleConfig(baseline=True)})})
    result = run_stage("prototype", cfg)
    card = result.data_card.read_text()
    assert "## Teacher ensemble" in card and "`baseline (labelled pool)`" in card and "**ensemble**" in card
    assert [e.label for e in result.journey] == ["teacher", "baseline (labelled pool)", "baseline (distillation labels)"]
    dataset = load_from_disk(result.dataset)
    inputs = len(load_task_data(cfg.task, cfg.run.seed).train)
    assert len(dataset) == result.metrics["kept"] and result.metrics["kept"] + result.metrics["rejected"] == \
        inputs * cfg.prototype.num_samples  # the ensemble's answers, sampled from its probabilities
    assert dataset[0]["teacher"] == f"ensemble of {cfg.prototype.teacher.label}, baseline (labelled pool)"
    assert sum(dataset[0]["choice_probs"].values()) == pytest.approx(1.0)


def validate_error(capsys, *overrides: str) -> str:
    assert main(["validate", str(TINY_CONFIG), *[a for o in overrides for a in ("--set", o)]]) == 2
    return capsys.readouterr().err


def test_an_ensemble_teacher_that_is_not_there_is_named_before_any_stage(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    error = validate_error(capsys, f"prototype.ensemble={{teachers: [{{path: {tmp_path / 'empty'}}}]}}")
    assert f"prototype.ensemble.teachers[0].path: {tmp_path / 'empty'} is empty" in error


def test_an_unreachable_served_ensemble_teacher_is_named_before_any_stage(capsys):
    url = f"http://127.0.0.1:{free_port()}/v1"
    error = validate_error(capsys, f"prototype.ensemble={{teachers: [{{base_url: '{url}', model: m, "
                                   f"tokenizer: {TINY_TEACHER}}}]}}")
    assert "prototype.ensemble.teachers[0]" in error and url in error



def retrained_as(worse_or_better: list[list[float]]):
    """A round's retrained member that labels the dev rows as given (a real member, built from its probabilities)."""
    def retrained(combined, number):
        return member(f"baseline (self-training round {number})", worse_or_better)
    return retrained


def test_a_self_training_round_that_makes_the_dev_score_worse_is_dropped_and_the_rounds_stop():
    teacher, pool_baseline = member("teacher", [[0.9, 0.1], [0.2, 0.8]]), member("baseline", [[0.6, 0.4], [0.4, 0.6]])
    wrong = [[0.0, 1.0], [1.0, 0.0]]  # sure of the wrong label on both dev rows: the ensemble drops from 1.0 to 0.0
    members, rounds = ensemble.self_trained([teacher, pool_baseline], retrained_as(wrong), dev_labels=[0, 1], rounds=3,
                                            replaces_last=True)
    assert [m.name for m in members] == ["teacher", "baseline"]  # the labels before self-training stay
    assert [(r.number, r.dev_score, r.kept) for r in rounds] == [(0, 1.0, True), (1, 0.0, False)]


def test_a_self_training_round_that_keeps_the_dev_score_replaces_the_baseline_and_the_next_round_runs():
    teacher, pool_baseline = member("teacher", [[0.9, 0.1], [0.2, 0.8]]), member("baseline", [[0.6, 0.4], [0.4, 0.6]])
    right = [[0.7, 0.3], [0.3, 0.7]]
    members, rounds = ensemble.self_trained([teacher, pool_baseline], retrained_as(right), dev_labels=[0, 1], rounds=2,
                                            replaces_last=True)
    assert [m.name for m in members] == ["teacher", "baseline (self-training round 2)"]
    assert [r.kept for r in rounds] == [True, True, True]


def test_a_self_trained_member_joins_an_ensemble_without_a_baseline():
    shot_sets = [member("teacher", [[0.9, 0.1], [0.2, 0.8]]), member("teacher (shot set 2)", [[0.8, 0.2], [0.3, 0.7]])]
    members, _ = ensemble.self_trained(shot_sets, retrained_as([[0.7, 0.3], [0.3, 0.7]]), [0, 1], rounds=1,
                                       replaces_last=False)
    assert [m.name for m in members] == ["teacher", "teacher (shot set 2)", "baseline (self-training round 1)"]


def test_the_data_card_says_which_round_made_the_dev_score_worse(tiny_cfg):
    rows = [{"text": "x", "label": "payment"}]
    held_out = np.array([[1.0, 0.0, 0.0, 0.0]])
    rounds = [ensemble.Round(0, 0.75, held_out, True), ensemble.Round(1, 0.5, held_out, False)]
    card = ensemble.rounds_card(rounds, 48, rows, tiny_cfg.task)
    assert "| 1 | 0.500 | 1.000 | no |" in card
    assert "Round 1 made the dev score worse (0.750 -> 0.500)" in card and "those before self-training" in card


def test_prototype_with_a_prompt_ensemble_and_a_self_training_round_cards_each(tiny_cfg):
    cfg = tiny_cfg.model_copy(update={"prototype": tiny_cfg.prototype.model_copy(update={
        "shot_candidates": 2, "shot_dev_size": 4,
        "ensemble": EnsembleConfig(shot_sets=2, baseline=True, self_training_rounds=1)})})
    result = run_stage("prototype", cfg)
    card = result.data_card.read_text()
    teacher = cfg.prototype.teacher.label
    assert f"`{teacher} (shot set 2)`" in card and "### Self-training" in card
    dataset = load_from_disk(result.dataset)
    assert dataset[0]["teacher"].startswith(f"ensemble of {teacher}, {teacher} (shot set 2), baseline (")
    assert sum(dataset[0]["choice_probs"].values()) == pytest.approx(1.0)
