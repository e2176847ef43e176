"""Experiment tracking at the edges of the work: one MLflow parent run per pipeline, a child per stage.

Stage code only sees a ``Tracker``; MLflow is imported when an ``MlflowTracker`` is made, so stages
also run where MLflow is not installed (a ``LogTracker`` then writes the same calls to the log).
"""

import fcntl
import json
import logging
import os
import socket
import sqlite3
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from contextlib import closing, contextmanager, nullcontext
from pathlib import Path
from typing import Any, Protocol

from distilflow.configs.schema import check_tracking_uri
from distilflow.tasks.artifacts import exclusive
from distilflow.tasks.environment import connection_problem
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


class Recorder:
    """A stage's tracker: what the stage logs is kept for its result, and the stage runner logs it once, so a
    cached stage's run gets the same params, metrics, tags and artifacts as a fresh one. Artifacts are files in
    the stage's output directory (``out_dir``), kept by their path in it. Its children (training phases) are
    live runs of ``live``: their step metrics are watched while they train."""

    run_id = None

    def __init__(self, live: Tracker, out_dir: Path):
        self.live, self.out_dir = live, out_dir
        self.params: dict[str, str] = {}
        self.metrics: dict[str, float] = {}
        self.tags: dict[str, str] = {}
        self.artifacts: dict[str, str] = {}  # path in out_dir -> the MLflow artifact directory ("" for the root)

    def log_params(self, params):
        self.params.update({key: str(value) for key, value in params.items()})

    def log_metrics(self, metrics, step=None):
        if step is not None:
            raise ValueError("a stage's metrics have no step: log a training step's in a child run")
        self.metrics.update(numeric_metrics(metrics))

    def set_tags(self, tags):
        self.tags.update({key: str(value) for key, value in tags.items()})

    def log_artifact(self, path, artifact_path=None):
        self.artifacts[str(Path(path).relative_to(self.out_dir))] = artifact_path or ""

    def child(self, name):
        return self.live.child(name)


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

    def __init__(self, client, run_id: str, liveness: "Liveness | None" = None):
        self.client, self.run_id, self.liveness = client, run_id, liveness

    @classmethod
    def start(cls, tracking_uri: str, experiment: str, artifact_root: Path, run_name: str,
              tags: dict[str, str], liveness_dir: Path | None = None) -> "MlflowTracker":
        """A new run in ``experiment``. With ``liveness_dir``, the run is marked as this process's (a lock file
        there, held while it runs), so a later run can tell it from one left RUNNING by a killed process."""
        with _one_store_creator(tracking_uri):
            client = open_store(tracking_uri)
            found = client.get_experiment_by_name(experiment)
            # A tracking server keeps artifacts where it was told to (--artifacts-destination, e.g. S3); a local
            # store keeps them under the workdir.
            served = tracking_uri.startswith(("http://", "https://"))
            experiment_id = found.experiment_id if found else client.create_experiment(
                experiment, artifact_location=None if served else artifact_root.as_uri())
        liveness = Liveness.hold(liveness_dir) if liveness_dir else None
        run = client.create_run(experiment_id, run_name=run_name, tags={**tags, **(liveness.tags if liveness else {})})
        return cls(client, run.info.run_id, liveness)

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
        except BaseException as err:
            try:
                self.client.set_terminated(child.run_id, end_status(err))
            except Exception as ending:
                # A stop (SIGTERM) that lands inside an MLflow call can leave this client's store unusable; the
                # error that ended the child is the one to report, and the parent's `finish` closes the child.
                log.warning("could not end MLflow run %s (%s): %s", child.run_id, name, ending)
            raise
        self.client.set_terminated(child.run_id, "FINISHED")

    def finish(self, error: BaseException | None = None) -> None:
        """End the run: FINISHED, or FAILED / KILLED (stopped by a signal) when ``error`` ended it, with any
        descendant still RUNNING."""
        status = "FINISHED" if error is None else end_status(error)
        if error is not None:
            experiment = self.client.get_run(self.run_id).info.experiment_id
            for each in _running_descendants(self.client, experiment, self.run_id):
                self.client.set_terminated(each.info.run_id, status)
        self.client.set_terminated(self.run_id, status)
        if self.liveness:
            self.liveness.release()

    def close_stale_runs(self) -> list[Any]:
        """Close the runs of this workdir and host that are RUNNING although their process is gone (killed with
        SIGKILL, a lost machine): KILLED, with the reason in the tag `distilflow.end_reason`. Returns them."""
        if self.liveness is None:
            return []
        return close_abandoned_runs(self.client, self.liveness.path.parent, f"run {self.run_id}")


def close_abandoned_runs(client, liveness_dir: Path, closer: str) -> list[Any]:
    """The RUNNING runs (of any experiment: run.name may have changed) started on this host with a lock in
    ``liveness_dir`` that no living process holds, and their RUNNING descendants, ended KILLED with the reason;
    returns the top-level ones."""
    experiments = [experiment.experiment_id for experiment in client.search_experiments()]
    running = client.search_runs(experiments, "attributes.status = 'RUNNING' and "
                                              f"tags.`distilflow.host` = '{socket.gethostname()}'")
    stale = [run for run in running if Liveness.abandoned(Path(run.data.tags.get(Liveness.TAG, "")), liveness_dir)]
    for run in stale:
        reason = (f"closed by {closer}: its process (pid {run.data.tags.get('distilflow.pid', '?')}) ended without "
                  "closing it (killed, e.g. SIGKILL or a lost machine)")
        for each in [run, *_running_descendants(client, run.info.experiment_id, run.info.run_id)]:
            client.set_tag(each.info.run_id, "distilflow.end_reason", reason)
            client.set_terminated(each.info.run_id, "KILLED")
        log.warning("MLflow run %s (%s) was left RUNNING by a killed run; %s", run.info.run_id, run.info.run_name,
                    reason)
    return stale


def _running_descendants(client, experiment_id: str, run_id: str) -> list[Any]:
    children = client.search_runs([experiment_id], f"tags.mlflow.parentRunId = '{run_id}' and "
                                                   "attributes.status = 'RUNNING'")
    return [r for child in children for r in [child, *_running_descendants(client, experiment_id, child.info.run_id)]]


def liveness_dir(workdir: Path) -> Path:
    """Where the runs of a workdir hold their liveness locks."""
    return workdir / "running"


def end_status(error: BaseException) -> str:
    """KILLED for a run stopped by a signal or Ctrl-C (BaseExceptions such as KeyboardInterrupt and Prefect's
    TerminationSignal), FAILED for an error."""
    return "FAILED" if isinstance(error, Exception) else "KILLED"


class Liveness:
    """A lock file held while a run's process lives: the kernel drops the lock when the process dies, however
    it dies, so a RUNNING MLflow run whose lock can be taken was abandoned."""

    TAG = "distilflow.liveness"

    def __init__(self, path: Path, handle):
        self.path, self.handle = path, handle

    @classmethod
    def hold(cls, directory: Path) -> "Liveness":
        directory.mkdir(parents=True, exist_ok=True)
        path = directory / f"{uuid.uuid4().hex}.lock"
        handle = open(path, "w")
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return cls(path, handle)

    @property
    def tags(self) -> dict[str, str]:
        return {self.TAG: str(self.path), "distilflow.host": socket.gethostname(), "distilflow.pid": str(os.getpid())}

    @staticmethod
    def abandoned(lock: Path, directory: Path) -> bool:
        """Whether ``lock`` (a run's, in ``directory``) is held by no living process."""
        if lock.parent != directory:
            return False  # another workdir's run: not ours to judge
        try:
            with open(lock) as handle:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return False
        except FileNotFoundError:
            return True
        lock.unlink(missing_ok=True)
        return True

    def release(self) -> None:
        self.path.unlink(missing_ok=True)
        self.handle.close()


def open_store(tracking_uri: str):
    """An MlflowClient on ``tracking_uri``. A new sqlite store is created whole (its tables made under a temporary
    name, then renamed), so a crash or a full disk never leaves a half-made store; a damaged one is named, with
    what to do."""
    from mlflow import MlflowClient

    database = sqlite_path(tracking_uri)
    if database is None:
        return MlflowClient(tracking_uri)
    if not database.exists():
        _create_sqlite_store(database)
    try:
        client = MlflowClient(tracking_uri)
        client.search_experiments(max_results=1)
    except Exception as err:  # sqlalchemy's and alembic's errors on a half-made or foreign schema
        holds = ("It holds runs: back it up, then try `mlflow db upgrade sqlite:///{0}`, or set "
                 "run.mlflow_tracking_uri to another store" if _holds_runs(database) else
                 "It holds no run (its creation was interrupted, e.g. by a full disk): move it away, e.g. "
                 "`mv {0} {0}.damaged`, and run again; a new store is made").format(database)
        raise DistilflowError(f"{database}: the MLflow store is damaged or was made by another MLflow version "
                              f"({_first_line(err)}). {holds}") from None
    return client


def _create_sqlite_store(database: Path) -> None:
    from mlflow import MlflowClient

    partial = database.with_name(f".{database.name}.creating-{uuid.uuid4().hex[:8]}")
    try:
        MlflowClient(f"sqlite:///{partial}").search_experiments(max_results=1)
        os.rename(partial, database)
    except Exception as err:
        raise DistilflowError(f"cannot create the MLflow store {database} ({_first_line(err)}); is its disk full or "
                              "read-only? Free space, or set run.workdir / run.mlflow_tracking_uri elsewhere") from err
    finally:
        for leftover in (partial, partial.with_name(partial.name + "-journal")):
            leftover.unlink(missing_ok=True)


def _holds_runs(database: Path) -> bool:
    try:
        with closing(sqlite3.connect(f"file:{database}?mode=ro", uri=True)) as connection:
            return connection.execute("SELECT count(*) FROM runs").fetchone()[0] > 0
    except sqlite3.Error:
        return False  # no runs table: its creation never got that far


def _first_line(error: BaseException) -> str:
    return (str(error).strip().splitlines() or [type(error).__name__])[0][:300]


def sqlite_path(tracking_uri: str) -> Path | None:
    """The database file of a ``sqlite:///`` tracking URI (None for any other store)."""
    return Path(tracking_uri.removeprefix("sqlite:///")) if tracking_uri.startswith("sqlite:///") else None


def _one_store_creator(tracking_uri: str):
    """Two runs starting on a fresh sqlite store would both run its schema migrations and collide."""
    database = sqlite_path(tracking_uri)
    if database is None:
        return nullcontext()
    database.parent.mkdir(parents=True, exist_ok=True)
    return exclusive(database.with_name(database.name + ".lock"))


def tracking_uri(configured: str | None, workdir: Path) -> str:
    """run.mlflow_tracking_uri, else $MLFLOW_TRACKING_URI, else a sqlite store in the workdir."""
    return configured or os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{workdir / 'mlflow.db'}"


def tracking_source(configured: str | None) -> str:
    """Where the tracking URI came from, to name in messages."""
    if configured:
        return "run.mlflow_tracking_uri"
    return "MLFLOW_TRACKING_URI" if os.environ.get("MLFLOW_TRACKING_URI") else "run.workdir (its mlflow.db)"


def check_tracking_store(tracking_uri: str, source: str = "run.mlflow_tracking_uri") -> None:
    """Fail fast, naming ``source`` (the key or variable that set the URI): a URI MLflow cannot use, a sqlite
    store where nothing can be written, an MLflow server that does not answer its health check."""
    try:
        database = check_tracking_uri(tracking_uri)
    except ValueError as err:
        raise DistilflowError(f"{source}: {err}") from None
    if database is not None:
        _check_writable_store(Path(database).resolve(), source)
    if not tracking_uri.startswith(("http://", "https://")):
        return
    health = tracking_uri.rstrip("/") + "/health"
    try:
        with urllib.request.urlopen(health, timeout=SERVER_PROBE_TIMEOUT_S) as answer:
            answer.read()
    except (urllib.error.URLError, TimeoutError, ConnectionError) as err:
        raise DistilflowError(
            f"MLflow tracking server {tracking_uri} does not answer ({connection_problem(getattr(err, 'reason', err))}); "
            "start it, fix run.mlflow_tracking_uri / MLFLOW_TRACKING_URI, or unset both to use a local sqlite store"
        ) from None


def _check_writable_store(database: Path, source: str) -> None:
    existing = database if database.exists() else database.parent
    while not existing.exists():
        existing = existing.parent
    usable = existing.is_file() if existing == database else existing.is_dir()
    if not usable or not os.access(existing, os.W_OK | (0 if existing == database else os.X_OK)):
        raise DistilflowError(f"{source}: cannot write the MLflow store {database} (in {existing}: read-only, or "
                              "not a directory); choose a writable place")


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
