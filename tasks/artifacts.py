"""The stage contract's plumbing: results with sha256 manifests, a content-addressed cache, atomic writes.

A stage's output lives in ``WORKDIR/artifacts/<stage>/<key>/``; the key hashes everything the output
depends on. It is written to a temp dir and renamed into place only when complete, and re-verified
against its manifest before reuse, so a crash or an edited file never passes for a finished artifact.
"""

import fcntl
import hashlib
import json
import logging
import os
import shutil
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from importlib.metadata import version
from pathlib import Path

from distilflow.tasks.errors import DistilflowError

log = logging.getLogger("distilflow")

MANIFEST = "manifest.json"
RESULT = "result.json"


@dataclass
class StageResult:
    """What a stage hands downstream: named output paths, metrics, journey entries and a summary."""

    stage: str
    files: dict[str, str]
    metrics: dict[str, float] = field(default_factory=dict)
    journey: list[dict] = field(default_factory=list)
    summary: str = ""
    key: str = ""
    directory: Path | None = None
    digest: str = ""
    cached: bool = False

    def path(self, name: str) -> Path:
        return self.directory / self.files[name]


def check_writable(workdir: Path) -> None:
    """The workdir (or the directory that will hold it) must be writable before any stage starts."""
    existing = workdir
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir() or not os.access(existing, os.W_OK | os.X_OK):
        raise DistilflowError(f"run.workdir {workdir}: cannot write in {existing}; choose another run.workdir")


def stage_key(stage: str, *inputs) -> str:
    """Hash of a stage's inputs (config sections, upstream digests) and the distilflow version."""
    payload = json.dumps({"stage": stage, "distilflow": version("distilflow"), "inputs": inputs},
                         sort_keys=True, default=str)
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


def file_sha256(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def write_manifest(directory: Path, exclude: tuple[str, ...] = (MANIFEST,)) -> dict[str, str]:
    files = {str(p.relative_to(directory)): file_sha256(p)
             for p in sorted(directory.rglob("*")) if p.is_file() and p.name not in exclude}
    (directory / MANIFEST).write_text(json.dumps({"files": files}, indent=1))
    return files


def manifest_problems(directory: Path) -> list[str]:
    """What differs between ``directory`` and its manifest: changed, missing or extra files."""
    manifest = directory / MANIFEST
    if not manifest.is_file():
        return [f"{manifest} is missing"]
    expected = json.loads(manifest.read_text())["files"]
    present = {str(p.relative_to(directory)) for p in directory.rglob("*") if p.is_file() and p.name != MANIFEST}
    problems = [f"missing: {name}" for name in sorted(expected.keys() - present)]
    problems += [f"not in manifest: {name}" for name in sorted(present - expected.keys())]
    problems += [f"changed: {name}" for name in sorted(expected.keys() & present)
                 if file_sha256(directory / name) != expected[name]]
    return problems


def manifest_digest(directory: Path) -> str:
    return hashlib.sha256((directory / MANIFEST).read_bytes()).hexdigest()


def cached_or_run(stage: str, key: str, workdir: Path, produce: Callable[[Path], StageResult]) -> StageResult:
    """Reuse ``WORKDIR/artifacts/stage/key`` if it verifies, else run ``produce(tmp_dir)`` and publish it."""
    final = workdir / "artifacts" / stage / key
    final.parent.mkdir(parents=True, exist_ok=True)
    with exclusive(final.parent / f"{key}.lock"):
        if final.exists():
            problems = manifest_problems(final)
            if not problems:
                return _load(final, cached=True)
            log.warning("%s: artifact %s no longer matches its manifest (%s); recomputing",
                        stage, final, "; ".join(problems[:3]))
        with published(final) as partial:
            partial.mkdir()
            result = produce(partial)
            (partial / RESULT).write_text(json.dumps(_to_json(result), indent=1))
            write_manifest(partial)
    return _load(final, cached=False)


def _to_json(result: StageResult) -> dict:
    return {k: v for k, v in asdict(result).items() if k not in ("directory", "digest", "cached")}


def _load(directory: Path, cached: bool) -> StageResult:
    result = StageResult(**json.loads((directory / RESULT).read_text()))
    result.directory, result.digest, result.cached = directory, manifest_digest(directory), cached
    return result


@contextmanager
def published(path: Path) -> Iterator[Path]:
    """A temporary path beside ``path`` to write a file or directory into; when the block ends without an error,
    it replaces ``path`` by a rename, so a reader never sees half of it. A crash leaves only the temporary path,
    which the next write of ``path`` removes: one writer of ``path`` at a time (callers hold a lock, or own it).
    """
    for leftover in path.parent.glob(f".{path.name}.partial-*"):
        _remove(leftover)
    partial = path.with_name(f".{path.name}.partial-{uuid.uuid4().hex[:8]}")
    try:
        yield partial
        if path.is_dir():
            shutil.rmtree(path)
        os.replace(partial, path)
    finally:
        _remove(partial)


def _remove(path: Path) -> None:
    if path.is_dir():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


@contextmanager
def exclusive(lock_path: Path) -> Iterator[None]:
    """One process at a time across the workdir: a second run waits here, then sees the first's work."""
    with open(lock_path, "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)
