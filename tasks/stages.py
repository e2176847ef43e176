"""Runs one stage under the stage contract: cache key, context, atomic publish, tracking.

Plain Python, no Prefect: flows/pipeline.py wraps each call in a flow run, and benchmarks call it
directly to measure what orchestration costs.
"""

import importlib
import logging
import os
import shutil
from dataclasses import dataclass

from distilflow.configs.schema import HttpTeacherConfig, PipelineConfig
from distilflow.tasks import artifacts
from distilflow.tasks.artifacts import StageResult
from distilflow.tasks.context import StageContext
from distilflow.tasks.data import check_few_shot_pool, load_task_data
from distilflow.tasks.models import resolve_device
from distilflow.tasks.teachers import api_key
from distilflow.tasks.tracking import LogTracker, Tracker, check_tracking_store

log = logging.getLogger("distilflow")


@dataclass(frozen=True)
class Stage:
    module: str
    needs: tuple[str, ...]


STAGES = {
    "prototype": Stage("distilflow.tasks.prototype", needs=()),
    "distill": Stage("distilflow.tasks.distill", needs=("prototype",)),
    "compress": Stage("distilflow.tasks.compress", needs=("prototype", "distill")),
    "deploy": Stage("distilflow.tasks.deploy", needs=("prototype", "distill", "compress")),
}


def preflight(cfg: PipelineConfig, tracking_uri: str) -> None:
    """Everything that can be checked before the first stage: task data (and its few-shot pool), workdir,
    device, tracking store, the API key of an HTTP teacher.

    A run that would fail on its input fails here, in seconds, with nothing written.
    """
    check_few_shot_pool(load_task_data(cfg.task, cfg.run.seed), cfg.task, cfg.prototype)
    artifacts.check_writable(cfg.run.workdir)
    resolve_device(cfg.run.device)
    check_tracking_store(tracking_uri)
    for key, teacher in http_teachers(cfg).items():
        api_key(teacher, os.environ, key)  # a missing key fails now, not after the teacher is half asked


def http_teachers(cfg: PipelineConfig) -> dict[str, HttpTeacherConfig]:
    teachers = {"prototype.teacher": cfg.prototype.teacher,
                "prototype.judge.teacher": cfg.prototype.judge and cfg.prototype.judge.teacher}
    return {key: teacher for key, teacher in teachers.items() if isinstance(teacher, HttpTeacherConfig)}


def cache_key(name: str, cfg: PipelineConfig, upstream: dict[str, StageResult]) -> str:
    """Everything a stage's output depends on: its section, the task (and its data's bytes), the
    evaluator, seed and device kind, and the digests of the upstream artifacts it reads."""
    return artifacts.stage_key(
        name,
        getattr(cfg, name).model_dump(mode="json"),
        cfg.task.model_dump(mode="json"),
        artifacts.file_sha256(cfg.task.data),
        cfg.eval.model_dump(mode="json"),
        cfg.run.seed,
        resolve_device(cfg.run.device).type,
        {n: upstream[n].digest for n in STAGES[name].needs},
    )


def run_stage(name: str, cfg: PipelineConfig, upstream: dict[str, StageResult],
              tracker: Tracker = LogTracker()) -> StageResult:
    """Run stage ``name`` (or reuse its verified artifact) and track it in a child of ``tracker``."""
    stage = STAGES[name]
    missing = [n for n in stage.needs if n not in upstream]
    if missing:
        raise ValueError(f"stage {name} needs the results of {missing}")
    key = cache_key(name, cfg, upstream)
    workdir = cfg.run.workdir
    checkpoint_dir = workdir / "checkpoints" / name / key
    with tracker.child(name) as stage_tracker:
        stage_tracker.set_tags({"distilflow.stage": name, "distilflow.cache_key": key})

        def produce(out_dir):
            ctx = StageContext(
                workdir=workdir, out_dir=out_dir, checkpoint_dir=checkpoint_dir,
                device=resolve_device(cfg.run.device), seed=cfg.run.seed, task=cfg.task,
                examples=load_task_data(cfg.task, cfg.run.seed), eval=cfg.eval, tracker=stage_tracker)
            log.info("%s: running (key %s)", name, key)
            return importlib.import_module(stage.module).run(getattr(cfg, name), upstream, ctx)

        result = artifacts.cached_or_run(name, key, workdir, produce)
        shutil.rmtree(checkpoint_dir, ignore_errors=True)  # only a crash leaves checkpoints worth keeping
        stage_tracker.set_tags({"distilflow.cached": str(result.cached).lower()})
        if result.cached:
            log.info("%s: reusing %s", name, result.directory)
            stage_tracker.log_metrics(result.metrics)
    return result
