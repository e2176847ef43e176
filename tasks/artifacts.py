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
import stat
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from importlib.metadata import version
from pathlib import Path
from typing import Annotated, TypeVar

from pydantic import AfterValidator, PlainSerializer, SerializationInfo, TypeAdapter, ValidationInfo

from distilflow.tasks.environment import disk_full_named
from distilflow.tasks.errors import DistilflowError

log = logging.getLogger("distilflow")

MANIFEST = "manifest.json"
RESULT = "result.json"


def _relative(path: Path, info: SerializationInfo) -> str:
    return path.relative_to(info.context["directory"]).as_posix()


def _absolute(path: Path, info: ValidationInfo) -> Path:
    return info.context["directory"] / path


# A path inside the stage's own directory: the stage gives it under ``ctx.out_dir``, result.json holds it relative,
# and a reader gets it under the published directory (the temporary one is renamed into place).
InArtifact = Annotated[Path, PlainSerializer(_relative), AfterValidator(_absolute)]


@dataclass(kw_only=True)
class StageOutput:
    """What every stage hands downstream besides its own typed fields (a subclass's): a markdown summary; what it
    tracked (params, metrics, tags, artifacts: paths in its directory), which the runner logs, cached or not; and,
    once published, where it lies and its manifest's digest (the cache key of everything downstream)."""

    summary: str = ""
    params: dict[str, str] = field(default_factory=dict)
    metrics: dict[str, float] = field(default_factory=dict)
    tags: dict[str, str] = field(default_factory=dict)
    artifacts: dict[str, str] = field(default_factory=dict)
    directory: Path | None = None
    digest: str = ""
    cached: bool = False


Output = TypeVar("Output", bound=StageOutput)


def check_writable(directory: Path, key: str = "run.workdir", why: str = "") -> None:
    """``directory`` (or the one that will hold it) must be writable before any stage starts."""
    existing = directory
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir() or not os.access(existing, os.W_OK | os.X_OK):
        problem = "a file, not a directory" if existing.exists() and not existing.is_dir() else "not writable"
        raise DistilflowError(f"{key} {directory}: cannot write in {existing} ({problem}{f'; {why}' if why else ''}); "
                              f"choose another {key}")


def stage_key(stage: str, *inputs) -> str:
    """Hash of a stage's inputs (config sections, upstream digests) and the distilflow version."""
    payload = json.dumps({"stage": stage, "distilflow": version("distilflow"), "inputs": inputs},
                         sort_keys=True, default=str)
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


def file_sha256(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def write_manifest(directory: Path) -> dict[str, str]:
    """Record the sha256 of every regular file under ``directory`` (and the target of every symlink, as
    such) in ``directory/manifest.json``; returns the files' digests."""
    entries, _ = _walk(directory)
    files = {name: file_sha256(directory / name) for name, kind in entries.items() if kind == "file"}
    links = {name: os.readlink(directory / name) for name, kind in entries.items() if kind == "symlink"}
    (directory / MANIFEST).write_text(json.dumps({"files": files, **({"links": links} if links else {})}, indent=1))
    return files


def manifest_problems(directory: Path) -> list[str]:
    """What differs between ``directory`` and its manifest: files changed, missing or added, and any symlink
    or other non-regular entry the manifest does not list as such. Empty when they match."""
    try:
        files, links = read_manifest(directory)
    except ManifestError as err:
        return [str(err)]
    entries, unreadable = _walk(directory)
    present = {name for name, kind in entries.items() if kind == "file"}
    problems = [f"missing: {name}" for name in sorted(files.keys() - entries.keys())]
    problems += [f"missing: {name} (a symlink)" for name in sorted(links.keys() - entries.keys())]
    problems += [f"not in manifest: {name}" for name in sorted(present - files.keys())]
    problems += [_changed(directory, name, files[name]) for name in sorted(files.keys() & present)]
    problems += [_kind_problem(directory, name, kind, files, links) for name, kind in sorted(entries.items())]
    return [problem for problem in problems if problem] + [f"unreadable: {entry}" for entry in unreadable]


def _kind_problem(directory: Path, name: str, kind: str, files: dict, links: dict) -> str | None:
    """A symlink the manifest does not list with this target, or any entry that is no file or directory."""
    if kind == "symlink":
        target = os.readlink(directory / name)
        if links.get(name) == target:
            return None
        listed = "a regular file in the manifest" if name in files else "not in the manifest as a symlink"
        return f"symlink: {name} -> {target} ({listed})"
    if kind == "directory":
        return f"changed: {name} is now a directory" if name in files else None
    return None if kind == "file" else f"not a regular file: {name} ({kind})"


class ManifestError(Exception):
    """A manifest.json that is missing or not a distilflow manifest."""


def read_manifest(directory: Path) -> tuple[dict[str, str], dict[str, str]]:
    """The manifest's files (path -> sha256) and symlinks (path -> target)."""
    manifest = directory / MANIFEST
    if manifest.is_symlink() or not manifest.is_file():
        raise ManifestError(f"{manifest} is missing" if not manifest.is_symlink() else
                            f"{manifest} is a symlink, not the bundle's own manifest")
    try:
        data = json.loads(manifest.read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError) as err:
        raise ManifestError(f"{manifest}: not a distilflow manifest ({err})") from None
    if not isinstance(data, dict) or not _string_map(data.get("files")) or not _string_map(data.get("links", {})):
        raise ManifestError(f"{manifest}: not a distilflow manifest (JSON with a \"files\" map of path to sha256)")
    return data["files"], data.get("links", {})


def _string_map(value) -> bool:
    return isinstance(value, dict) and all(isinstance(k, str) and isinstance(v, str) for k, v in value.items())


def _changed(directory: Path, name: str, digest: str) -> str | None:
    try:
        return None if file_sha256(directory / name) == digest else f"changed: {name}"
    except OSError as err:
        return f"unreadable: {name} ({err.strerror})"


ENTRY_KINDS = {stat.S_IFREG: "file", stat.S_IFDIR: "directory", stat.S_IFLNK: "symlink", stat.S_IFIFO: "fifo",
               stat.S_IFSOCK: "socket", stat.S_IFCHR: "character device", stat.S_IFBLK: "block device"}


def _walk(directory: Path) -> tuple[dict[str, str], list[str]]:
    """Every entry under ``directory`` but its top-level manifest, by relative path -> kind ("file",
    "directory", "symlink", ...), and the directories that could not be read. Symlinks are never followed:
    a linked directory is one "symlink" entry."""
    entries, errors = {}, []
    for root, dirs, names in os.walk(directory, onerror=lambda err: errors.append(f"{err.filename} ({err.strerror})")):
        for name in dirs + names:
            path = Path(root) / name
            relative = str(path.relative_to(directory))
            if relative != MANIFEST:
                entries[relative] = ENTRY_KINDS.get(stat.S_IFMT(os.lstat(path).st_mode), "unknown")
    return entries, errors


def manifest_digest(directory: Path) -> str:
    return hashlib.sha256((directory / MANIFEST).read_bytes()).hexdigest()


def cached_or_run(stage: str, key: str, workdir: Path, produce: Callable[[Path], Output], kind: type[Output],
                  store=None) -> Output:
    """Reuse ``WORKDIR/artifacts/stage/key`` if it verifies, else run ``produce(tmp_dir)`` and publish it; either
    way, the ``kind`` of output read back from its result.json. With a shared ``store`` (an
    ``artifact_store.ArtifactStore``), an artifact published there is downloaded instead of produced, and a
    produced one is published there too, by the key's one writer."""
    final = workdir / "artifacts" / stage / key
    final.parent.mkdir(parents=True, exist_ok=True)
    with exclusive(final.parent / f"{key}.lock"):
        if _verified(stage, final) and store is None:
            return _load(final, kind, cached=True)
        if store is None:
            _produce(stage, final, produce)
            return _load(final, kind, cached=False)
        with store.lease(stage, key):
            marker = store.published(stage, key)
            if marker and not _verified(stage, final):
                _download(store, stage, key, marker, final)
            if marker:
                return _load(final, kind, cached=True)
            fresh = not _verified(stage, final)
            if fresh:
                _produce(stage, final, produce)
            store.publish(final, stage, key)
            return _load(final, kind, cached=not fresh)


def fetched(stage: str, key: str, workdir: Path, kind: type[Output], store) -> Output:
    """The artifact ``key`` of ``stage`` that another process published to ``store``: the local copy under
    ``WORKDIR/artifacts`` if it verifies, else downloaded there first."""
    final = workdir / "artifacts" / stage / key
    final.parent.mkdir(parents=True, exist_ok=True)
    with exclusive(final.parent / f"{key}.lock"):
        if not _verified(stage, final):
            marker = store.published(stage, key)
            if marker is None:
                raise DistilflowError(f"{stage} artifact {key} is not in run.artifact_store {store.url}: its stage "
                                      "has not published it (did it run against another store?)")
            _download(store, stage, key, marker, final)
    return _load(final, kind, cached=True)


def _verified(stage: str, final: Path) -> bool:
    if not final.exists():
        return False
    problems = manifest_problems(final)
    if problems:
        log.warning("%s: artifact %s no longer matches its manifest (%s); replacing it",
                    stage, final, "; ".join(problems[:3]))
    return not problems


def _produce(stage: str, final: Path, produce: Callable[[Path], StageOutput]) -> None:
    with published(final) as partial, disk_full_named(stage, partial):
        partial.mkdir()
        result = produce(partial)
        (partial / RESULT).write_text(json.dumps(_to_json(result, partial), indent=1))
        write_manifest(partial)
        make_world_readable(partial)


def _download(store, stage: str, key: str, marker: dict, final: Path) -> None:
    with published(final) as partial, disk_full_named(stage, partial):
        store.download(stage, key, marker, partial)
        make_world_readable(partial)


def make_world_readable(directory: Path) -> None:
    """Every file readable and every directory listable by anyone: safetensors writes its files 0600, and a
    container serving the bundle as a non-root user could not read them."""
    for path in [directory, *directory.rglob("*")]:
        if not path.is_symlink():
            path.chmod(path.stat().st_mode | (0o555 if path.is_dir() else 0o444))


def _to_json(result: StageOutput, directory: Path) -> dict:
    return TypeAdapter(type(result)).dump_python(result, mode="json", exclude={"directory", "digest", "cached"},
                                                 context={"directory": directory})


def _load(directory: Path, kind: type[Output], cached: bool) -> Output:
    result = TypeAdapter(kind).validate_python(json.loads((directory / RESULT).read_text()),
                                               context={"directory": directory})
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
