"""The machine failing under a run: a full disk, a path that cannot be written, a server that cannot be reached.

Each is said as what it is, naming the file or endpoint and what to do, so that it is reported as the user's to
fix (exit 2), never as a bug. The places that know the config key say it there (preflight, the HTTP teacher,
the stage runner); ``problem`` recognises the rest wherever they surface, for the CLI's last word.
"""

import errno
import os
import socket
import ssl
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from distilflow.tasks.errors import DistilflowError

DISK_FULL_ERRNOS = {errno.ENOSPC, errno.EDQUOT}
# How writers that raise no OSError say it: safetensors' Rust error, sqlite's.
DISK_FULL_WORDS = ("No space left on device", "Disk quota exceeded", "database or disk is full")

PATH_FAULTS = {
    errno.EROFS: "its file system is read-only",
    errno.EACCES: "permission denied",
    errno.EPERM: "operation not permitted",
    errno.ENOTDIR: "a part of the path is a file, not a directory",
    errno.EISDIR: "it is a directory, where a file belongs",
    errno.EFBIG: "the file would be larger than this process may write (`ulimit -f`)",
}

# Below this, a stage's failure is taken for the full disk it most likely met, whatever the writer said (torch's
# checkpoint writer says only "file write failed", MLflow's sqlite store "database or disk is full").
NEARLY_FULL_BYTES = 1 << 20


def causes(error: BaseException | None) -> Iterator[BaseException]:
    """``error`` and the errors it was raised from or while handling, newest first."""
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        yield error
        error = error.__cause__ or error.__context__


def problem(error: BaseException, mlflow_store: str | None = None) -> str | None:
    """The environment's fault behind ``error`` (it or any error in its chain), in a sentence that names the file
    and what to do; None for anything else (a bug). ``mlflow_store``: the run's tracking URI, named when sqlite
    says its disk is full (it does not say which file)."""
    for each in causes(error):
        if is_disk_full(each):
            return disk_full(each, mlflow_store)
        if isinstance(each, OSError) and each.errno in PATH_FAULTS and each.filename:
            return (f"cannot use {each.filename}: {PATH_FAULTS[each.errno]}; make it writable, or point the setting "
                    "that names it elsewhere (run.workdir, DISTILFLOW_HOME, PREFECT_HOME, run.mlflow_tracking_uri)")
        if isinstance(each, (ssl.SSLError, socket.gaierror)):
            return f"a connection failed: {connection_problem(each)}"
    return None


def is_disk_full(error: BaseException) -> bool:
    """Whether ``error`` itself says that a disk is full (or a quota used up)."""
    if isinstance(error, OSError) and error.errno in DISK_FULL_ERRNOS:
        return True
    return any(words in str(error) for words in DISK_FULL_WORDS)


def disk_full(error: BaseException, mlflow_store: str | None = None) -> str:
    """What ``error`` (one that ``is_disk_full``) says of where, and what to do."""
    if getattr(error, "filename", None):
        where = f"the disk is full writing {error.filename} ({_size(free_bytes(Path(error.filename)))} free there)"
    else:
        where = _mlflow_store_full(mlflow_store) if "database or disk is full" in str(error) else "a disk is full"
    return f"{where}; free space, or set run.workdir on a larger disk, and run again: finished stages are kept"


def _mlflow_store_full(uri: str | None) -> str:
    """sqlite says "database or disk is full" without its file: the run's tracking URI names it."""
    store = Path(uri.removeprefix("sqlite:///")) if uri and uri.startswith("sqlite:///") else None
    if store is None:
        return f"the MLflow store's disk is full{f' ({uri})' if uri else ''}"
    return f"the disk is full writing the MLflow store {store} ({_size(free_bytes(store))} free there)"


@contextmanager
def disk_full_named(stage: str, partial: Path) -> Iterator[None]:
    """``stage`` writing its output into ``partial``: a failure while that disk is full, however the writer says
    it, becomes an error naming the directory, the space left, what the stage had written and what its last
    finished output here took. (A full disk elsewhere, e.g. the MLflow store's, is left to ``problem``.)"""
    try:
        yield
    except Exception as err:
        if isinstance(err, DistilflowError) or free_bytes(partial.parent) >= NEARLY_FULL_BYTES:
            raise
        last = max((p for p in partial.parent.iterdir() if p.is_dir() and not p.name.startswith(".")),
                   key=lambda p: p.stat().st_mtime, default=None)
        need = f"; its last finished output here took {_size(tree_bytes(last))}" if last else ""
        raise DistilflowError(
            f"{stage}: the disk is full writing in {partial.parent} ({_size(free_bytes(partial.parent))} free there; "
            f"the stage had written {_size(tree_bytes(partial))}{need}); free space, or set run.workdir on a larger "
            "disk, and run again: finished stages are kept") from err


def connection_problem(error: BaseException | str) -> str:
    """Why a connection failed, from the first error in ``error``'s chain that says: TLS, DNS, refused, dropped
    (``error`` may be a reason urllib gives as text)."""
    if not isinstance(error, BaseException):
        return str(error)
    for each in causes(error):
        if isinstance(each, ssl.SSLCertVerificationError):
            return (f"its TLS certificate is not trusted here ({each.verify_message}); if your own CA signed it, "
                    "give that CA's bundle in SSL_CERT_FILE")
        if isinstance(each, ssl.SSLError):
            return f"the TLS handshake failed ({each.reason or each}); is it an https server? (a plain one: http://)"
        if isinstance(each, socket.gaierror):
            return f"its host name does not resolve ({each.strerror}); check the host in the URL, or this machine's DNS"
        if isinstance(each, ConnectionRefusedError):
            return "it refused the connection; is the server running, on that port?"
        if type(each).__name__ == "RemoteProtocolError":  # h11's, and each HTTP client's that wraps it
            return f"it dropped the connection in the middle of an answer ({each}); did the server crash?"
    return f"{type(error).__name__}: {error}"


def free_bytes(path: Path) -> int:
    """Bytes this process can still write on the file system of ``path`` (or of its nearest parent); root may
    write into the blocks reserved for it."""
    while not path.exists() and path != path.parent:
        path = path.parent
    stats = os.statvfs(path)
    return (stats.f_bfree if os.geteuid() == 0 else stats.f_bavail) * stats.f_frsize


def tree_bytes(path: Path) -> int:
    """The size of the files under ``path`` (0 if it is gone)."""
    return sum(os.lstat(os.path.join(root, name)).st_size for root, _, names in os.walk(path) for name in names)


def _size(count: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if count < 1000 or unit == "GB":
            return f"{count:.0f} {unit}" if unit == "B" else f"{count:.1f} {unit}"
        count /= 1000
