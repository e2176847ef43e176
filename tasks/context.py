"""What every stage function receives besides its config section and the outputs of the stages it reads."""

from dataclasses import dataclass, field
from pathlib import Path

import torch

from distilflow.tasks.evaluate import Evaluator
from distilflow.tasks.tracking import LogTracker, Tracker


@dataclass
class StageContext:
    """The run around a stage: where to write, on what device, measured by which evaluator, tracked where.

    ``out_dir`` is the stage's private temp dir (published atomically when the stage returns);
    ``checkpoint_dir`` survives a crash, so long training resumes from it. ``evaluator`` holds the task and its
    held-out split: every model a stage makes is measured by it.
    """

    workdir: Path
    out_dir: Path
    checkpoint_dir: Path
    device: torch.device
    seed: int
    evaluator: Evaluator
    tracker: Tracker = field(default_factory=LogTracker)
