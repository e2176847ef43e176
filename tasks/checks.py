"""The task's check: whether an answer is valid, and how good it is (0..1).

One function serves three roles: the filter in rejection sampling, the metric in evaluation and
the reward in RL, so every stage agrees on what a good answer is.
"""

from distilflow.configs.schema import TaskConfig
from distilflow.tasks import data


def is_valid(answer: str, task: TaskConfig) -> bool:
    """The answer has the required form (for `choice`: it is one of the labels)."""
    return answer in task.check.choices


def score(answer: str, row: dict, task: TaskConfig) -> float:
    """1.0 for a valid answer that matches the row's reference, 0.0 otherwise; for an unlabelled
    row, validity alone."""
    if not is_valid(answer, task):
        return 0.0
    reference = data.label(row, task)
    return 1.0 if reference is None or answer == reference else 0.0
