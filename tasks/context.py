"""What every stage function receives besides its config section and upstream results."""

from dataclasses import dataclass, field
from pathlib import Path

import torch

from distilflow.configs.schema import EvalConfig, TaskConfig
from distilflow.tasks.data import TaskData
from distilflow.tasks.tracking import LogTracker, Tracker


@dataclass
class StageContext:
    """The run around a stage: where to write, on what device, with which task, tracked where.

    ``out_dir`` is the stage's private temp dir (published atomically when the stage returns);
    ``checkpoint_dir`` survives a crash, so long training resumes from it.
    """

    workdir: Path
    out_dir: Path
    checkpoint_dir: Path
    device: torch.device
    seed: int
    task: TaskConfig
    examples: TaskData
    eval: EvalConfig
    tracker: Tracker = field(default_factory=LogTracker)
