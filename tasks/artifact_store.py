"""Stage artifacts in a shared store (`run.artifact_store`: any fsspec URL, e.g. s3://bucket/prefix), so that a stage on
another machine reads what an upstream stage published.

The store keeps the local cache's guarantees. A stage's directory is uploaded under a fresh prefix,
``<stage>/<key>/<upload>/``, and published by one small object written last, ``<stage>/<key>/published.json``
(the upload's name and the sha256 of its manifest): a single PUT is atomic on object stores, so a reader sees the
whole artifact or none, and a crashed upload is only an orphaned prefix. A download is checked against the manifest
before anything reads it. One writer per key: a lease object created with the store's exclusive write (S3's
If-None-Match), renewed while its holder works, taken over once it is older than ``LEASE_TTL_S``.
"""

import json
import logging
import os
import socket
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import fsspec
from fsspec.implementations.local import LocalFileSystem

from distilflow.tasks.artifacts import MANIFEST, file_sha256, manifest_digest, manifest_problems, read_manifest
from distilflow.tasks.environment import causes
from distilflow.tasks.errors import DistilflowError, ServiceError

log = logging.getLogger("distilflow")

MARKER = "published.json"
LEASE = "lease.json"
LEASE_TTL_S = 120.0  # a holder renews every third of it: only a dead holder's lease gets this old
LEASE_POLL_S = 2.0


class StoreUnreachable(ServiceError):
    """The artifact store did not answer; raised from the connection error, so the stage's retries see it."""


class ArtifactStore:
    """Published stage artifacts under one fsspec URL. Credentials and endpoints come from the store's own
    environment (for S3: AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_ENDPOINT_URL), never from the config."""

    def __init__(self, url: str):
        self.url = url
        # a fresh client: one cached by fsspec would keep the endpoint of the environment it was made in
        self.fs, self.root = fsspec.core.url_to_fs(url, skip_instance_cache=True)
        if isinstance(self.fs, LocalFileSystem):
            self.fs.auto_mkdir = True  # object stores have no directories to make; a local store does

    def _path(self, stage: str, key: str, *parts: str) -> str:
        return "/".join([self.root.rstrip("/"), stage, key, *parts])

    def published(self, stage: str, key: str) -> dict | None:
        """The marker of ``stage``'s artifact ``key`` ({"upload", "manifest_sha256"}), or None if not published."""
        with self._reaching():
            try:
                return json.loads(self.fs.cat_file(self._path(stage, key, MARKER)))
            except FileNotFoundError:
                return None

    def publish(self, directory: Path, stage: str, key: str) -> None:
        """Upload ``directory`` (a published local artifact, its manifest verified) under a fresh prefix, then
        write the marker that makes it visible."""
        upload = uuid.uuid4().hex[:12]
        files, _ = read_manifest(directory)
        with self._reaching():
            for name in [*sorted(files), MANIFEST]:
                self.fs.put_file(str(directory / name), self._path(stage, key, upload, name))
            marker = {"upload": upload, "manifest_sha256": manifest_digest(directory)}
            self.fs.pipe_file(self._path(stage, key, MARKER), json.dumps(marker).encode())
        log.info("%s: published %s to %s", stage, key, self._path(stage, key, upload))

    def download(self, stage: str, key: str, marker: dict, partial: Path) -> None:
        """The published artifact into ``partial`` (a fresh local directory), checked against its manifest; the
        manifest's symlinks are made again (object stores have none)."""
        prefix = self._path(stage, key, marker["upload"])
        partial.mkdir(parents=True)
        with self._reaching():
            self.fs.get_file(f"{prefix}/{MANIFEST}", str(partial / MANIFEST))
            if file_sha256(partial / MANIFEST) != marker["manifest_sha256"]:
                raise DistilflowError(f"{self.url}: {stage}/{key} has a manifest that differs from the one published; "
                                      "delete that prefix from the store and run again")
            files, links = read_manifest(partial)
            for name in files:
                (partial / name).parent.mkdir(parents=True, exist_ok=True)
                self.fs.get_file(f"{prefix}/{name}", str(partial / name))
        for name, target in links.items():
            (partial / name).parent.mkdir(parents=True, exist_ok=True)
            os.symlink(target, partial / name)
        problems = manifest_problems(partial)
        if problems:
            raise DistilflowError(f"{self.url}: {stage}/{key} does not match its manifest ({'; '.join(problems[:3])}); "
                                  "delete that prefix from the store and run again")

    def record_stage_run(self, flow_run_id: str, stage: str, key: str) -> None:
        """Say which artifact the stage's flow run ``flow_run_id`` published, for the pipeline that started it on
        another machine (it cannot compute the key: the key holds the device kind the stage ran on)."""
        with self._reaching():
            self.fs.pipe_file(f"{self.root.rstrip('/')}/flow-runs/{flow_run_id}.json",
                              json.dumps({"stage": stage, "key": key}).encode())

    def stage_run(self, flow_run_id: str) -> dict | None:
        """What ``record_stage_run`` recorded for ``flow_run_id`` ({"stage", "key"}), or None."""
        with self._reaching():
            try:
                return json.loads(self.fs.cat_file(f"{self.root.rstrip('/')}/flow-runs/{flow_run_id}.json"))
            except FileNotFoundError:
                return None

    @contextmanager
    def lease(self, stage: str, key: str) -> Iterator[None]:
        """Hold the one writer's lease of ``stage``/``key`` until the block ends; waits while another holds it."""
        path = self._path(stage, key, LEASE)
        holder = json.dumps({"host": socket.gethostname(), "pid": os.getpid(), "id": uuid.uuid4().hex}).encode()
        while not self._take(path, holder):
            time.sleep(LEASE_POLL_S)
        done = threading.Event()
        renewer = threading.Thread(target=self._renew, args=(path, holder, done), daemon=True)
        renewer.start()
        try:
            yield
        finally:
            done.set()
            renewer.join()
            with self._reaching():
                self.fs.rm_file(path)

    def _take(self, path: str, holder: bytes) -> bool:
        """Create the lease if nobody holds it, or if its holder stopped renewing it (then it is taken over)."""
        with self._reaching():
            try:
                with self.fs.open(path, "xb") as lease:
                    lease.write(holder)
                return True
            except FileExistsError:
                pass
            try:
                age = time.time() - self.fs.modified(path).timestamp()
            except FileNotFoundError:
                return False  # released meanwhile: try again
            if age < LEASE_TTL_S:
                return False
            log.warning("%s: lease last renewed %.0f s ago; its holder is gone, taking it over", path, age)
            self.fs.rm_file(path)
            return False

    def _renew(self, path: str, holder: bytes, done: threading.Event) -> None:
        while not done.wait(LEASE_TTL_S / 3):
            try:
                self.fs.pipe_file(path, holder)
            except Exception as err:  # noqa: BLE001 — the work goes on; a lost lease costs at most a duplicate
                log.warning("%s: could not renew the lease (%s)", path, err)

    @contextmanager
    def _reaching(self) -> Iterator[None]:
        """A connection that fails becomes StoreUnreachable, naming the store and what to check."""
        try:
            yield
        except Exception as err:
            if not any(_is_connection_failure(each) for each in causes(err)):
                raise
            # Said as the builtin ConnectionError it is (the S3 client's own classes are not), so the stage's
            # transient-failure retries know it.
            connection = ConnectionError(f"{type(err).__name__}: {err}")
            connection.__cause__ = err
            raise StoreUnreachable(
                f"run.artifact_store {self.url} does not answer ({err}); check that the store is up and reachable "
                "from this machine (for S3-compatible stores: AWS_ENDPOINT_URL)") from connection


def _is_connection_failure(error: BaseException) -> bool:
    """Builtin connection errors and the S3 client's (botocore names them by class: EndpointConnectionError,
    ConnectTimeoutError, ReadTimeoutError, ConnectionClosedError)."""
    return isinstance(error, (ConnectionError, TimeoutError)) or type(error).__name__ in {
        "EndpointConnectionError", "ConnectTimeoutError", "ReadTimeoutError", "ConnectionClosedError",
        "ClientConnectorError", "ServerDisconnectedError"}


def open_store(url: str | None) -> ArtifactStore | None:
    return ArtifactStore(url) if url else None


def check_store(url: str) -> None:
    """Preflight: the store's library is installed, and a probe object can be written and removed there."""
    try:
        store = ArtifactStore(url)
    except ImportError as err:
        raise DistilflowError(f"run.artifact_store {url} needs a library that is not installed ({err}); install it "
                              "(for s3://: pip install s3fs)") from None
    probe = f"{store.root.rstrip('/')}/.distilflow-probe-{uuid.uuid4().hex[:8]}"
    with store._reaching():
        try:
            store.fs.pipe_file(probe, b"")
            store.fs.rm_file(probe)
        except (OSError, PermissionError) as err:
            raise DistilflowError(f"run.artifact_store {url}: cannot write there ({err}); create the bucket or "
                                  "directory, or check the store's credentials") from None
