"""Experiment tracking at the edges of the work: one MLflow parent run per pipeline, a child per stage.

Stage code only sees a ``Tracker``; MLflow is imported when an ``MlflowTracker`` is made, so stages
also run where MLflow is not installed (a ``LogTracker`` then writes the same calls to the log).
"""

import json
import logging
import os
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Any, Protocol

from transformers import TrainerCallback

from distilflow.tasks.artifacts import exclusive
from distilflow.tasks.errors import DistilflowError

log = logging.getLogger("distilflow")

# A tracking server that does not answer within this time fails the run at its start, instead of
# MLflow's own retries stalling it for minutes.
SERVER_PROBE_TIMEOUT_S = 10


class Tracker(Protocol):
    run_id: str | None

    def log_params(self, params: dict[str, Any]) -> None: ...
    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None: ...
    def set_tags(self, tags: dict[str, str]) -> None: ...
    def log_artifact(self, path: Path, artifact_path: str | None = None) -> None: ...
    def child(self, name: str): ...


class LogTracker:
    """Tracking into the log, for stage functions run outside the pipeline."""

    run_id = None

    def log_params(self, params):
        log.info("params %s", params)

    def log_metrics(self, metrics, step=None):
        log.info("metrics%s %s", f" step {step}" if step is not None else "", metrics)

    def set_tags(self, tags):
        log.info("tags %s", tags)

    def log_artifact(self, path, artifact_path=None):
        log.info("artifact %s", path)

    @contextmanager
    def child(self, name):
        yield self


class FileTracker(LogTracker):
    """Tracking into a JSON-lines file, for work in worker processes (no MLflow there); the parent
    ``replay``s it into its own tracker."""

    def __init__(self, path: Path):
        self.path = Path(path)

    def log_params(self, params):
        self._write({"params": params})

    def log_metrics(self, metrics, step=None):
        self._write({"metrics": metrics, "step": step})

    def log_artifact(self, path, artifact_path=None):
        self._write({"artifact": str(path), "artifact_path": artifact_path})

    def _write(self, record: dict) -> None:
        with open(self.path, "a") as lines:
            lines.write(json.dumps(record, default=str) + "\n")

    @staticmethod
    def replay(path: Path, tracker: Tracker) -> None:
        if not Path(path).is_file():
            return
        for line in Path(path).read_text().splitlines():
            record = json.loads(line)
            if "params" in record:
                tracker.log_params(record["params"])
            elif "metrics" in record:
                tracker.log_metrics(record["metrics"], step=record["step"])
            else:
                tracker.log_artifact(Path(record["artifact"]), record["artifact_path"])


class MlflowTracker:
    """An MLflow run addressed by id through the client API: safe from Prefect's worker threads."""

    def __init__(self, client, run_id: str):
        self.client, self.run_id = client, run_id

    @classmethod
    def start(cls, tracking_uri: str, experiment: str, artifact_root: Path, run_name: str,
              tags: dict[str, str]) -> "MlflowTracker":
        from mlflow import MlflowClient

        with _one_store_creator(tracking_uri):
            client = MlflowClient(tracking_uri)
            found = client.get_experiment_by_name(experiment)
            experiment_id = found.experiment_id if found else client.create_experiment(
                experiment, artifact_location=artifact_root.as_uri())
        run = client.create_run(experiment_id, run_name=run_name, tags=tags)
        return cls(client, run.info.run_id)

    @classmethod
    def attach(cls, tracking_uri: str, run_id: str) -> "MlflowTracker":
        from mlflow import MlflowClient

        return cls(MlflowClient(tracking_uri), run_id)

    def log_params(self, params):
        from mlflow.entities import Param

        items = [Param(k, str(v)[:6000]) for k, v in params.items()]
        for start in range(0, len(items), 100):
            self.client.log_batch(self.run_id, params=items[start:start + 100])

    def log_metrics(self, metrics, step=None):
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        items = [Metric(k, float(v), now, step or 0) for k, v in numeric_metrics(metrics).items()]
        if items:
            self.client.log_batch(self.run_id, metrics=items)

    def set_tags(self, tags):
        for key, value in tags.items():
            self.client.set_tag(self.run_id, key, str(value))

    def log_artifact(self, path, artifact_path=None):
        path = Path(path)
        if path.is_dir():
            self.client.log_artifacts(self.run_id, str(path), artifact_path)
        else:
            self.client.log_artifact(self.run_id, str(path), artifact_path)

    @contextmanager
    def child(self, name: str) -> Iterator["MlflowTracker"]:
        parent = self.client.get_run(self.run_id)
        run = self.client.create_run(parent.info.experiment_id, run_name=name,
                                     tags={"mlflow.parentRunId": self.run_id})
        child = MlflowTracker(self.client, run.info.run_id)
        try:
            yield child
        except BaseException:
            self.client.set_terminated(child.run_id, "FAILED")
            raise
        self.client.set_terminated(child.run_id, "FINISHED")

    def finish(self, failed: bool = False) -> None:
        self.client.set_terminated(self.run_id, "FAILED" if failed else "FINISHED")


def _one_store_creator(tracking_uri: str):
    """Two runs starting on a fresh sqlite store would both run its schema migrations and collide."""
    if not tracking_uri.startswith("sqlite:///"):
        return nullcontext()
    database = Path(tracking_uri.removeprefix("sqlite:///"))
    database.parent.mkdir(parents=True, exist_ok=True)
    return exclusive(database.with_name(database.name + ".lock"))


def tracking_uri(configured: str | None, workdir: Path) -> str:
    """run.mlflow_tracking_uri, else $MLFLOW_TRACKING_URI, else a sqlite store in the workdir."""
    return configured or os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{workdir / 'mlflow.db'}"


def check_tracking_store(tracking_uri: str) -> None:
    """Fail fast, with the URI named, when an MLflow server does not answer its health check."""
    if not tracking_uri.startswith(("http://", "https://")):
        return
    health = tracking_uri.rstrip("/") + "/health"
    try:
        with urllib.request.urlopen(health, timeout=SERVER_PROBE_TIMEOUT_S) as answer:
            answer.read()
    except (urllib.error.URLError, TimeoutError, ConnectionError) as err:
        raise DistilflowError(
            f"MLflow tracking server {tracking_uri} does not answer ({getattr(err, 'reason', err)}); start it, "
            "fix run.mlflow_tracking_uri / MLFLOW_TRACKING_URI, or unset both to use a local sqlite store") from None


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def numeric_metrics(metrics: dict) -> dict[str, float]:
    """What an MLflow metric can hold: numbers as they are, an interval ``[low, high]`` (``task_score_ci``) as
    ``KEY_low`` and ``KEY_high``; anything else (None, text) left out."""
    flat = {}
    for key, value in metrics.items():
        if _is_number(value):
            flat[key] = value
        elif isinstance(value, (list, tuple)) and len(value) == 2 and all(map(_is_number, value)):
            flat[f"{key}_low"], flat[f"{key}_high"] = value
    return flat


def flatten(nested: dict, prefix: str = "") -> dict[str, Any]:
    """``{"distill": {"lora": {"r": 16}}}`` -> ``{"distill.lora.r": 16}``."""
    flat = {}
    for key, value in nested.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(flatten(value, f"{name}."))
        else:
            flat[name] = value
    return flat


class TrackerCallback(TrainerCallback):
    """Sends the trainer's logged losses and learning rates to the tracker, with their steps."""

    def __init__(self, tracker: Tracker, prefix: str):
        self.tracker, self.prefix = tracker, prefix

    def on_log(self, args, state, control, logs=None, **kwargs):
        if state.is_world_process_zero and logs:
            self.tracker.log_metrics({f"{self.prefix}.{k}": v for k, v in logs.items()}, step=state.global_step)
