"""Several label sources, one soft label per input: the teacher, more teachers and the TF-IDF baseline each give
their probability of every label of a choice task, each is calibrated on the labelled pool (temperature scaling:
one temperature per source, fitted to the pool's labels), and the ensemble's probability is their weighted mean.

A small teacher's errors and a bag-of-words classifier's are different errors: on the demo the teacher labels
0.645 of the held-out tickets right, the baseline trained on 64 labelled tickets 0.75, their calibrated mean 0.82.
Calibration matters because the sources are not equally sure: scikit-learn's logistic regression on 64 examples
spreads its probability thin (0.44 on its answer, on average), and an uncalibrated mean lets the teacher outvote it.
"""

from collections.abc import Callable
from dataclasses import dataclass, replace

import numpy as np
from scipy.optimize import minimize_scalar

from distilflow.configs.schema import TaskConfig
from distilflow.tasks import checks
from distilflow.tasks.evaluate import score_interval


@dataclass
class Member:
    """One label source: its probabilities (rows x labels, in the task's label order) on the training inputs, on
    the held-out split and on the dev rows (labelled pool rows no member learned from or was shown: what decides
    whether a self-training round stays), and its weight in the mean."""

    name: str
    inputs: np.ndarray
    held_out: np.ndarray
    dev: np.ndarray
    weight: float = 1.0
    temperature: float = 1.0  # fitted on the labelled pool (``calibrated``); 1: as the source gave them

    def calibrated(self, pool: np.ndarray, labels: list[int]) -> "Member":
        """The member with its probabilities tempered by the temperature that fits ``pool`` (its probabilities on
        labelled examples it did not learn from or see as shots) to their ``labels`` best (least log-loss)."""
        temperature = fitted_temperature(pool, labels) if len(labels) else 1.0
        return Member(self.name, tempered(self.inputs, temperature), tempered(self.held_out, temperature),
                      tempered(self.dev, temperature), self.weight, temperature)


def tempered(probabilities: np.ndarray, temperature: float) -> np.ndarray:
    """softmax(log p / T): below 1 sharper, above 1 flatter; 0 stays 0."""
    logits = np.log(np.clip(probabilities, 1e-12, None)) / temperature
    exp = np.exp(logits - logits.max(1, keepdims=True))
    return exp / exp.sum(1, keepdims=True)


def fitted_temperature(probabilities: np.ndarray, labels: list[int]) -> float:
    """The temperature (between e^-4 and e^4) under which ``probabilities`` give ``labels`` the least log-loss."""
    rows = np.arange(len(labels))

    def log_loss(log_temperature: float) -> float:
        return -np.log(tempered(probabilities, np.exp(log_temperature))[rows, labels] + 1e-12).mean()

    return float(np.exp(minimize_scalar(log_loss, bounds=(-4, 4), method="bounded").x))


def mean(members: list[Member]) -> Member:
    """The ensemble as a member of its own: the weighted mean of the members' probabilities."""
    weights = np.array([member.weight for member in members]) / sum(member.weight for member in members)
    return Member("ensemble", *(sum(w * getattr(m, rows) for w, m in zip(weights, members))
                                for rows in ("inputs", "held_out", "dev")))


def dev_score(member: Member, labels: list[int]) -> float:
    """The member's accuracy on the dev rows (their label indices ``labels``); 0 without dev rows."""
    return float((member.dev.argmax(1) == np.array(labels)).mean()) if len(labels) else 0.0


@dataclass
class Round:
    """One self-training round: the ensemble's dev score with the retrained member, and whether the round stayed."""

    number: int
    dev_score: float
    held_out: np.ndarray  # the round's ensemble on the held-out split, for the data card
    kept: bool


def self_trained(members: list[Member], retrained: Callable[[Member, int], Member], dev_labels: list[int],
                 rounds: int, replaces_last: bool) -> tuple[list[Member], list[Round]]:
    """Self-training: each round, ``retrained`` (the ensemble, the round's number) gives a member that learned from
    the ensemble's labels; it takes the last member's place (``replaces_last``: the baseline's) or joins, and the
    ensemble labels again. A round is kept while the dev score does not drop; the first that drops ends the rounds
    and the members stay as they were before it. Round 0 is the ensemble before self-training."""
    history = [Round(0, dev_score(mean(members), dev_labels), mean(members).held_out, True)]
    for number in range(1, rounds + 1):
        student = retrained(mean(members), number)
        candidate = [*members[:-1], replace(student, weight=members[-1].weight)] if replaces_last \
            else [*members, student]
        combined = mean(candidate)
        score = dev_score(combined, dev_labels)
        kept = score >= history[-1].dev_score
        history.append(Round(number, score, combined.held_out, kept))
        if not kept:
            break
        members, replaces_last = candidate, True
    return members, history


def held_out_score(probabilities: np.ndarray, rows: list[dict], task: TaskConfig) -> tuple[float, list[float]]:
    """The accuracy of label ``probabilities`` on the held-out split (the most likely label against each row's), and
    its 95% interval."""
    scores = [checks.score(task.check.choices[i], row, task) for i, row in zip(probabilities.argmax(1), rows)]
    return sum(scores) / len(scores), score_interval(scores)


def card(members: list[Member], ensemble: Member, rows: list[dict], task: TaskConfig) -> str:
    """The data card's section: each member's held-out score and weight, and the ensemble's."""
    lines = ["## Teacher ensemble", "",
             "Each input's soft label is the weighted mean of these sources' label probabilities, each calibrated on "
             "the labelled pool by a temperature of its own (prototype.ensemble); the kept answer is its most likely "
             "label.", "",
             "| label source | weight | temperature | held-out score | 95% CI |", "|---|---|---|---|---|"]
    total = sum(member.weight for member in members)
    for member in [*members, ensemble]:
        score, (low, high) = held_out_score(member.held_out, rows, task)
        weight, temperature = (f"{member.weight / total:.2f}", f"{member.temperature:.2f}") \
            if member is not ensemble else ("–", "–")
        name = f"**{member.name}**" if member is ensemble else f"`{member.name}`"
        lines.append(f"| {name} | {weight} | {temperature} | {score:.3f} | {low:.3f}–{high:.3f} |")
    return "\n".join(lines) + "\n"


def rounds_card(rounds: list[Round], dev_rows: int, rows: list[dict], task: TaskConfig) -> str:
    """The data card's section on self-training: each round's dev and held-out scores, and whether it stayed."""
    if not rounds:
        return ""
    lines = ["", "### Self-training", "",
             f"Each round the TF-IDF baseline learned the ensemble's labels and took the baseline's place; a round "
             f"stays only if the ensemble's score on {dev_rows} labelled pool rows no member learned from does not "
             "drop (prototype.ensemble.self_training_rounds).", "",
             "| round | dev score | held-out score | kept |", "|---|---|---|---|"]
    for r in rounds:
        held_out = held_out_score(r.held_out, rows, task)[0]
        lines.append(f"| {r.number or 'before'} | {r.dev_score:.3f} | {held_out:.3f} | {'yes' if r.kept else 'no'} |")
    if not rounds[-1].kept:
        lines += ["", f"Round {rounds[-1].number} made the dev score worse ({rounds[-2].dev_score:.3f} -> "
                      f"{rounds[-1].dev_score:.3f}): the rounds stopped and its labels were dropped; the labels kept are "
                      f"{'those before self-training' if len(rounds) == 2 else f'those of round {rounds[-2].number}'}."]
    return "\n".join(lines) + "\n"
