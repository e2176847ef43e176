"""The servers of a team's stack, started for tests on 127.0.0.1 and stopped by their PID: an S3-compatible object store
(moto's standalone server), a throwaway PostgreSQL cluster, a Prefect server and an MLflow tracking server on it, and
Prefect process workers. Each is a context manager yielding what a client needs to reach it."""

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from tests.conftest import REPO, free_port

BIN = Path(sys.executable).parent
STARTUP_S = 240  # Prefect and MLflow servers take 10-40 s to start on a loaded 2-core machine
S3_CREDENTIALS = {"AWS_ACCESS_KEY_ID": "test-key-not-a-secret", "AWS_SECRET_ACCESS_KEY": "test-secret-not-a-secret",
                  "AWS_DEFAULT_REGION": "us-east-1"}


def start(command: list[str], log: Path, env: dict | None = None, user: str | None = None) -> subprocess.Popen:
    """``command`` in its own process group (a worker's flow-run processes are stopped with it), output to ``log``."""
    with open(log, "w") as out:
        return subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env={**os.environ, **(env or {})},
                                cwd=REPO, user=user, start_new_session=True)


def stop(process: subprocess.Popen) -> None:
    """SIGTERM by PID, a second one for a process that ignores the first while idle, then SIGKILL (to its group
    when it leads one: its children, flow-run processes, too)."""
    for each in (signal.SIGTERM, signal.SIGTERM):
        if process.poll() is not None:
            break
        process.send_signal(each)
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            pass
    try:
        if os.getpgid(process.pid) == process.pid:
            os.killpg(process.pid, signal.SIGKILL)
        else:
            process.kill()
    except ProcessLookupError:
        pass
    process.wait()


def wait_until(ready, what: str, process: subprocess.Popen, log: Path, timeout_s: float = STARTUP_S) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"{what} exited ({process.returncode}):\n{log.read_text()[-4000:]}")
        if ready():
            return
        time.sleep(0.5)
    raise RuntimeError(f"{what} not ready after {timeout_s} s:\n{log.read_text()[-4000:]}")


def answers(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2):
            return True
    except OSError:
        return False


@contextmanager
def s3_server(directory: Path, bucket: str = "distilflow") -> Iterator[dict]:
    """moto's S3-compatible server with ``bucket`` created; yields its environment for clients (endpoint,
    credentials) and the bucket's URL."""
    port = free_port()
    env = {**S3_CREDENTIALS, "AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}"}
    process = start([str(BIN / "moto_server"), "-H", "127.0.0.1", "-p", str(port)], directory / "s3.log")
    try:
        wait_until(lambda: answers(env["AWS_ENDPOINT_URL"] + "/moto-api/"), "moto S3 server", process,
                   directory / "s3.log")
        import boto3

        boto3.client("s3", endpoint_url=env["AWS_ENDPOINT_URL"], aws_access_key_id=env["AWS_ACCESS_KEY_ID"],
                     aws_secret_access_key=env["AWS_SECRET_ACCESS_KEY"],
                     region_name=env["AWS_DEFAULT_REGION"]).create_bucket(Bucket=bucket)
        yield {"env": env, "url": f"s3://{bucket}", "process": process, "port": port}
    finally:
        stop(process)


def _unprivileged_user() -> str | None:
    """PostgreSQL refuses to run as root: the cluster runs as the `postgres` system user then (Debian's package
    creates it), else as whoever runs the tests."""
    return "postgres" if os.geteuid() == 0 else None


def _postgres_bin() -> Path:
    initdb = shutil.which("initdb") or next(iter(sorted(Path("/usr/lib/postgresql").glob("*/bin/initdb"))), None)
    if initdb is None:
        raise RuntimeError("PostgreSQL's initdb is not installed (Debian: apt-get install postgresql)")
    return Path(initdb).resolve().parent


@contextmanager
def postgres(directory: Path, databases: tuple[str, ...] = ("prefect", "mlflow")) -> Iterator[dict]:
    """A throwaway PostgreSQL cluster on 127.0.0.1 (trust authentication, loopback only) with ``databases``; yields
    {"host", "port", "user"}. Run as root, the cluster lives in its own directory under the system's temp dir, which
    the `postgres` user can reach (pytest's are private to root), and is removed after."""
    user = _unprivileged_user()
    home = Path(tempfile.mkdtemp(prefix="distilflow-postgres-")) if user else directory
    if user:
        shutil.chown(home, user)
    bin_dir, port = _postgres_bin(), free_port()

    def postgres_command(*command: str) -> None:
        done = subprocess.run([str(bin_dir / command[0]), *command[1:]], capture_output=True, text=True, user=user,
                              cwd=home)
        if done.returncode:
            raise RuntimeError(f"{' '.join(command)} failed:\n{done.stdout}{done.stderr}")

    options = f"-h 127.0.0.1 -p {port} -k {home} -c fsync=off -c max_connections=200"
    postgres_command("initdb", "-D", str(home / "pgdata"), "-U", "distilflow", "--auth", "trust", "--no-sync")
    postgres_command("pg_ctl", "-D", str(home / "pgdata"), "-l", str(home / "postgres.log"), "-o", options, "-w",
                     "start")
    try:
        for name in databases:
            postgres_command("createdb", "-h", "127.0.0.1", "-p", str(port), "-U", "distilflow", name)
        yield {"host": "127.0.0.1", "port": port, "user": "distilflow"}
    finally:
        subprocess.run([str(bin_dir / "pg_ctl"), "-D", str(home / "pgdata"), "-m", "fast", "-w", "stop"],
                       capture_output=True, user=user, cwd=home)
        if user:
            shutil.rmtree(home, ignore_errors=True)


@contextmanager
def prefect_server(directory: Path, database: dict) -> Iterator[dict]:
    """`prefect server start` on PostgreSQL; yields its API URL and the environment for its clients."""
    port = free_port()
    url = f"http://127.0.0.1:{port}/api"
    db = f"postgresql+asyncpg://{database['user']}@{database['host']}:{database['port']}/prefect"
    env = {"PREFECT_HOME": str(directory / "prefect-server"), "PREFECT_API_DATABASE_CONNECTION_URL": db,
           "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "PREFECT_UI_ENABLED": "false"}
    env.pop("PREFECT_API_URL", None)
    process = start([str(BIN / "prefect"), "server", "start", "--host", "127.0.0.1", "--port", str(port)],
                    directory / "prefect-server.log", env)
    try:
        wait_until(lambda: _healthy(url), "prefect server", process, directory / "prefect-server.log")
        yield {"url": url, "env": {"PREFECT_API_URL": url}, "database": db}
    finally:
        stop(process)


def _healthy(url: str) -> bool:
    try:
        with urllib.request.urlopen(f"{url}/health", timeout=2) as answer:
            return json.loads(answer.read()) is True
    except OSError:
        return False


@contextmanager
def mlflow_server(directory: Path, database: dict, s3: dict) -> Iterator[dict]:
    """`mlflow server` with its backend store on PostgreSQL and its artifacts on the S3 server; yields its URI."""
    port = free_port()
    uri = f"http://127.0.0.1:{port}"
    backend = f"postgresql://{database['user']}@{database['host']}:{database['port']}/mlflow"
    env = {**s3["env"], "MLFLOW_S3_ENDPOINT_URL": s3["env"]["AWS_ENDPOINT_URL"],
           "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    process = start([str(BIN / "mlflow"), "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
                     "--backend-store-uri", backend, "--artifacts-destination", f"{s3['url']}/mlflow"],
                    directory / "mlflow.log", env)
    try:
        wait_until(lambda: answers(f"{uri}/health"), "mlflow server", process, directory / "mlflow.log")
        yield {"uri": uri, "backend": backend}
    finally:
        stop(process)


@contextmanager
def process_worker(directory: Path, pool: str, env: dict) -> Iterator[subprocess.Popen]:
    """`prefect worker start` on process work pool ``pool`` (created if missing); its flow runs get ``env``."""
    log = directory / f"worker-{pool}.log"
    process = start([str(BIN / "prefect"), "worker", "start", "--pool", pool, "--type", "process",
                     "--prefetch-seconds", "1"], log, {**env, "PREFECT_WORKER_QUERY_SECONDS": "1",
                                                         "PREFECT_WORKER_HEARTBEAT_SECONDS": "5"})
    try:
        wait_until(lambda: "started" in log.read_text().lower(), f"worker of {pool}", process, log)
        yield process
    finally:
        stop(process)


class CuttableLink:
    """A TCP relay on 127.0.0.1 to ``port``: a network path to a server that a test can cut (every connection dropped,
    new ones closed at once) and restore, while the server itself keeps running with its state."""

    def __init__(self, port: int):
        self.target, self.connected, self.up = port, [], True
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            client, _ = self.listener.accept()
            if not self.up:
                client.close()
                continue
            server = socket.create_connection(("127.0.0.1", self.target))
            self.connected += [client, server]
            for source, sink in ((client, server), (server, client)):
                threading.Thread(target=self._relay, args=(source, sink), daemon=True).start()

    @staticmethod
    def _relay(source: socket.socket, sink: socket.socket) -> None:
        try:
            while data := source.recv(65536):
                sink.sendall(data)
        except OSError:
            pass
        finally:
            for end in (source, sink):
                end.close()

    def cut(self) -> None:
        self.up = False
        for end in self.connected:
            try:
                end.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        self.connected = []

    def restore(self) -> None:
        self.up = True
