"""Faults of the user's machine, met the way a user meets them (the `distilflow` command): a disk that fills during a
stage, paths that are files, read-only or forbidden, a teacher server that answers with something that is no
answer, TLS and DNS failures. Each ends in one `error:` line that names the place and what to do, exit 2; none is
reported as "unexpected ... (a bug ...)".

Real faults, no mocks: a real tmpfs that fills (mounted in a user namespace, so no root and no mount is left
behind), real read-only mounts and permission bits, the real test server (tests/openai_server.py) answering badly,
a real TLS server with a certificate nothing trusts, a host name that does not resolve."""

import errno
import json
import os
import shlex
import socket
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest

from distilflow.flows.cli import main
from distilflow.tasks.environment import problem
from tests.conftest import SERVER_API_KEY, TINY_CONFIG, TINY_TEACHER, free_port, serving, wait_until_serving
from tests.test_bad_inputs import assert_nothing_finished

DISTILFLOW = str(Path(sys.executable).with_name("distilflow"))
KEY_ENV = "DISTILFLOW_TEST_TEACHER_KEY"
# The tiny config, smaller still, the HTTP teacher's client retrying once and the stage not at all: these runs end in
# an error, and should end soon.
SMALL = ["task.max_train=12", "task.eval_size=8", "run.retries=0"]
NOWHERE_HOST = "distilflow-test.invalid"  # .invalid never resolves (RFC 2606)


def one_error_line(code: int, stderr: str) -> str:
    """The run's one `error:` line (exit 2, no traceback, not "unexpected")."""
    errors = [line for line in stderr.splitlines() if line.startswith("error:")]
    assert code == 2 and len(errors) == 1, stderr[-4000:]
    assert "unexpected" not in errors[0] and "Traceback" not in stderr and "Logging error" not in stderr, stderr[-4000:]
    return errors[0]


def settings(*overrides: str) -> list[str]:
    return [arg for override in overrides for arg in ("--set", override)]


def teacher_at(base_url: str) -> str:
    return (f"prototype.teacher={{base_url: '{base_url}', model: tiny-teacher, api_key_env: {KEY_ENV}, "
            "max_retries: 1}")


def served_teacher_run(command: str, base_url: str, workdir: Path, *overrides: str) -> list[str]:
    return [command, str(TINY_CONFIG), *settings(f"run.workdir={workdir}", teacher_at(base_url),
                                                 f"distill.student={{path: {TINY_TEACHER}}}", *SMALL, *overrides)]


@pytest.fixture
def key(monkeypatch):
    monkeypatch.setenv(KEY_ENV, SERVER_API_KEY)


@pytest.fixture(scope="module")
def prefect_server():
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=600):  # a busy 2-core machine has taken minutes
        yield


# --- a teacher server that answers with something that is no answer ----------------------------------------------

@pytest.fixture(scope="module")
def faulty_server(tmp_path_factory):
    """The test server, answering as a fault asks (``answer_with``)."""
    with serving(tmp_path_factory.mktemp("faulty")) as (server, _):
        yield server


def answer_with(server, fault: str | None, after: int = 0) -> None:
    """From the (after + 1)th completion request on (after = 0: at once, the model list too), answer with ``fault``."""
    request = urllib.request.Request(server.base_url.removesuffix("/v1") + "/test/fault", method="POST",
                                     data=json.dumps({"fault": fault, "after": after}).encode(),
                                     headers={"Content-Type": "application/json"})
    urllib.request.urlopen(request, timeout=10).close()


@pytest.fixture
def faulty(faulty_server, key):
    yield faulty_server
    answer_with(faulty_server, None)


# What the error says of each fault: at the start (the model list) and mid-stage (an answer).
AT_THE_START = {
    "not-json": "answered with a body that is not JSON ('upstream connect error",
    "wrong-shape": "does not serve 'tiny-teacher'; its /models lists no model: is base_url a server's OpenAI API",
    "html": "answered with a body that is not JSON ('<!DOCTYPE html>",
    "truncated": "it dropped the connection in the middle of an answer",
}
MID_STAGE = {**AT_THE_START, "wrong-shape": "answered with JSON of another shape"}


@pytest.mark.parametrize("fault", sorted(AT_THE_START))
def test_validate_names_a_teacher_server_that_answers_with_no_openai_answer(faulty, tmp_path, capsys, fault):
    answer_with(faulty, fault)
    error = one_error_line(main(served_teacher_run("validate", faulty.base_url, tmp_path)), capsys.readouterr().err)
    assert error.startswith("error: prototype.teacher") and AT_THE_START[fault] in error


@pytest.mark.parametrize("fault", sorted(MID_STAGE))
def test_a_teacher_server_that_starts_answering_garbage_mid_stage_ends_the_run_in_one_error_line(
        faulty, prefect_server, tmp_path, capsys, fault):
    answer_with(faulty, fault, after=3)
    code = main(served_teacher_run("run", faulty.base_url, tmp_path / "work"))
    error = one_error_line(code, capsys.readouterr().err)
    assert error.startswith("error: prototype.teacher") and MID_STAGE[fault] in error
    assert_nothing_finished(tmp_path / "work")


def test_run_names_a_teacher_server_that_answers_html_before_any_stage(faulty, prefect_server, tmp_path, capsys):
    answer_with(faulty, "html")
    code = main(served_teacher_run("run", faulty.base_url, tmp_path / "work"))
    assert AT_THE_START["html"] in one_error_line(code, capsys.readouterr().err)
    assert not (tmp_path / "work" / "artifacts").exists()


# --- TLS and DNS --------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def untrusted_tls_server(tmp_path_factory):
    """The test server over HTTPS, its certificate self-signed (as a corporate proxy's or a lab server's)."""
    directory = tmp_path_factory.mktemp("tls")
    cert, private_key = directory / "cert.pem", directory / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=127.0.0.1",
                    "-addext", "subjectAltName=IP:127.0.0.1", "-keyout", str(private_key), "-out", str(cert)],
                   check=True, capture_output=True)
    with serving(directory, "--ssl-certfile", str(cert), "--ssl-keyfile", str(private_key), wait=False) as (server, process):
        base_url = server.base_url.replace("http://", "https://")
        wait_until_serving(base_url, process, next(directory.glob("server-*.log")), insecure=True)
        yield base_url, cert


def test_a_teacher_certificate_not_trusted_here_is_named_and_ssl_cert_file_fixes_it(untrusted_tls_server, key,
                                                                                   tmp_path, capsys, monkeypatch):
    base_url, cert = untrusted_tls_server
    error = one_error_line(main(served_teacher_run("validate", base_url, tmp_path)), capsys.readouterr().err)
    assert "prototype.teacher.base_url" in error and "its TLS certificate is not trusted here" in error
    assert "SSL_CERT_FILE" in error
    monkeypatch.setenv("SSL_CERT_FILE", str(cert))  # what the message says to do
    assert main(served_teacher_run("validate", base_url, tmp_path)) == 0, capsys.readouterr().err


def test_https_to_a_plain_http_teacher_is_named_as_a_failed_tls_handshake(faulty, tmp_path, capsys):
    https = faulty.base_url.replace("http://", "https://")
    error = one_error_line(main(served_teacher_run("validate", https, tmp_path)), capsys.readouterr().err)
    assert "prototype.teacher.base_url" in error and "the TLS handshake failed" in error and "http://" in error


def test_https_to_a_plain_http_mlflow_server_is_named_as_a_failed_tls_handshake(faulty, tmp_path, capsys):
    uri = faulty.base_url.removesuffix("/v1").replace("http://", "https://")
    code = main(["validate", str(TINY_CONFIG), *settings(f"run.workdir={tmp_path}", f"run.mlflow_tracking_uri={uri}")])
    error = one_error_line(code, capsys.readouterr().err)
    assert f"MLflow tracking server {uri} does not answer (the TLS handshake failed" in error


def test_a_teacher_host_name_that_does_not_resolve_is_named(key, tmp_path, capsys):
    code = main(served_teacher_run("validate", f"http://{NOWHERE_HOST}/v1", tmp_path))
    error = one_error_line(code, capsys.readouterr().err)
    assert "prototype.teacher.base_url" in error and "its host name does not resolve" in error


@pytest.mark.parametrize("command", ["validate", "run"])
def test_a_tracking_server_host_name_that_does_not_resolve_is_named(prefect_server, tmp_path, capsys, command):
    uri = f"http://{NOWHERE_HOST}:5000"
    code = main([command, str(TINY_CONFIG), *settings(f"run.workdir={tmp_path}", f"run.mlflow_tracking_uri={uri}")])
    assert "its host name does not resolve" in one_error_line(code, capsys.readouterr().err)


def test_a_prefect_api_whose_host_name_does_not_resolve_is_named(tmp_path, capsys):
    from prefect.settings import PREFECT_API_URL, temporary_settings

    url = f"http://{NOWHERE_HOST}:4200/api"
    with temporary_settings({PREFECT_API_URL: url}):
        code = main(["run", str(TINY_CONFIG), *settings(f"run.workdir={tmp_path}")])
    error = one_error_line(code, capsys.readouterr().err)
    assert f"the Prefect API {url} (PREFECT_API_URL) does not answer (its host name does not resolve" in error


# --- paths that cannot be used: a file in the way, read-only, forbidden -------------------------------------------

def namespaces_work() -> bool:
    try:
        return subprocess.run(["unshare", "--user", "--map-root-user", "--mount", "true"], timeout=30).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


needs_namespaces = pytest.mark.skipif(not namespaces_work(), reason="needs `unshare` with user namespaces")


def in_namespaces(script: str, as_root: bool, **env: str) -> subprocess.CompletedProcess:
    """``script`` (sh) in new user and mount namespaces: as root of them (it may mount; what it mounts goes when it
    ends), or as an unmapped user (the files of this machine's root then count their permission bits, as any other
    user's files do)."""
    flags = ["--map-root-user", "--mount"] if as_root else []
    return subprocess.run(["unshare", "--user", *flags, "sh", "-c", script], capture_output=True, text=True,
                          env={**os.environ, **env}, timeout=1800)


def command_line(command: str, workdir: Path, *overrides: str) -> str:
    return shlex.join([DISTILFLOW, command, str(TINY_CONFIG), *settings(f"run.workdir={workdir}", *overrides)])


# Each place a run writes that the config or the environment names: the setting, and where it points.
PLACES = {
    "run.workdir": lambda blocked: ({}, [f"run.workdir={blocked / 'work'}"]),
    "DISTILFLOW_HOME": lambda blocked: ({"DISTILFLOW_HOME": str(blocked / "home")}, []),
    "PREFECT_HOME": lambda blocked: ({"PREFECT_HOME": str(blocked / "prefect")}, []),
    "run.mlflow_tracking_uri": lambda blocked: ({}, [f"run.mlflow_tracking_uri=sqlite:///{blocked / 'mlflow.db'}"]),
}


@pytest.mark.parametrize("place", sorted(PLACES))
def test_run_names_a_file_standing_where_a_directory_it_writes_belongs(tmp_path, place):
    """DISTILFLOW_HOME a file made `run` fail with "unexpected NotADirectoryError" (validate caught it)."""
    (tmp_path / "a-file").write_text("")
    env, overrides = PLACES[place](tmp_path / "a-file")
    done = subprocess.run([DISTILFLOW, "run", str(TINY_CONFIG), *settings(f"run.workdir={tmp_path / 'run'}",
                                                                          *overrides)],
                          capture_output=True, text=True, env={**os.environ, **env}, timeout=900)
    error = one_error_line(done.returncode, done.stderr)
    assert place in error and str(tmp_path / "a-file") in error


def blocked_places():
    """Each fault at each place, met by `validate` (which starts no Prefect server: not PREFECT_HOME) and by `run`.
    `run` meets a forbidden place the same way as `validate` does, in preflight (run's own path to each place: the
    read-only cases), so those cases are in `make test-slow`; PREFECT_HOME's are run's alone."""
    for fault in ("read-only", "no-permission"):
        for place in sorted(PLACES):
            for command in ("validate", "run"):
                if command == "validate" and place == "PREFECT_HOME":
                    continue
                duplicate = command == "run" and fault == "no-permission" and place != "PREFECT_HOME"
                yield pytest.param(fault, place, command, id=f"{fault}-{place}-{command}",
                                   marks=[pytest.mark.slow] if duplicate else [])


@needs_namespaces
@pytest.mark.parametrize("fault, place, command", list(blocked_places()))
def test_a_read_only_or_forbidden_place_is_named_before_any_stage(tmp_path, place, command, fault):
    blocked = tmp_path / "blocked"
    blocked.mkdir(mode=0o555)
    env, overrides = PLACES[place](blocked)
    run = command_line(command, tmp_path / "run", *overrides)
    done = in_namespaces(f"mount --bind -o ro {blocked} {blocked} && exec {run}", as_root=True, **env) \
        if fault == "read-only" else in_namespaces(f"exec {run}", as_root=False, **env)
    error = one_error_line(done.returncode, done.stderr)
    assert place.split(" ")[0] in error and str(blocked) in error
    assert not (tmp_path / "run" / "artifacts").exists()


# --- a disk that fills during a stage ----------------------------------------------------------------------------

def run_until_the_disk_fills(tmp_path: Path, stage: str, then: str = "") -> tuple[subprocess.CompletedProcess, str]:
    """`distilflow run` with its workdir on a small tmpfs, filled (by another process) the moment ``stage`` starts
    writing its output; then ``then`` (sh) in the same namespaces, the tmpfs still mounted. Returns the process and
    the first run's stderr."""
    workdir, first = tmp_path / "work", tmp_path / "first-run.txt"
    workdir.mkdir()
    partial = shlex.quote(str(workdir / "artifacts" / stage))
    script = f"""
        mount -t tmpfs -o size=256m tmpfs {workdir} || exit 99
        ( until ls -d {partial}/.*partial-* >/dev/null 2>&1; do sleep 0.05; done
          head -c 1G /dev/zero > {workdir}/filler 2>/dev/null ) &
        {command_line("run", workdir)} 2> {first}
        echo "exit $?" >> {first}
        {then}
    """
    done = in_namespaces(script, as_root=True)
    assert done.returncode != 99, done.stderr
    said = first.read_text()
    return done, said


def first_exit(said: str) -> int:
    return int(said.rstrip().rsplit("exit ", 1)[1])


@needs_namespaces
def test_a_disk_that_fills_during_distill_is_named_and_the_rerun_after_freeing_it_resumes(tmp_path):
    """safetensors says it as a SafetensorError, MLflow's sqlite store as "database or disk is full": neither is an
    OSError, and both were "unexpected" bugs."""
    rerun = tmp_path / "rerun.txt"
    done, said = run_until_the_disk_fills(tmp_path, "distill", then=f"""
        rm {tmp_path / 'work' / 'filler'}
        {command_line("run", tmp_path / "work")} > {rerun} 2>&1
        echo "exit $?" >> {rerun}""")
    error = one_error_line(first_exit(said), said)
    assert "the disk is full" in error and str(tmp_path / "work") in error and "free space" in error
    resumed = rerun.read_text()
    assert first_exit(resumed) == 0, resumed[-4000:]
    assert "prototype: reusing" in resumed and "distill: running" in resumed


@pytest.mark.slow
@needs_namespaces
@pytest.mark.parametrize("stage", ["prototype", "compress", "deploy"])
def test_a_disk_that_fills_during_any_stage_is_named(tmp_path, stage):
    _, said = run_until_the_disk_fills(tmp_path, stage)
    error = one_error_line(first_exit(said), said)
    assert "the disk is full" in error and str(tmp_path / "work") in error


def test_a_temporary_prefect_server_that_does_not_start_in_time_is_named(tmp_path):
    """A busy machine (here: a limit no server can meet) was "unexpected RuntimeError: Timed out ... ephemeral"."""
    done = subprocess.run([DISTILFLOW, "run", str(TINY_CONFIG), *settings(f"run.workdir={tmp_path / 'work'}")],
                          capture_output=True, text=True, timeout=900,
                          env={**os.environ, "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "1"})
    error = one_error_line(done.returncode, done.stderr)
    assert "the temporary Prefect server did not answer within 1 s" in error
    assert "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS" in error and "PREFECT_API_URL" in error


def raised(action) -> BaseException:
    try:
        action()
    except Exception as err:
        return err
    raise AssertionError("it did not fail")


def wrapped(error: BaseException) -> BaseException:
    """``error`` as a library re-raises it: the cause of another exception."""
    try:
        raise RuntimeError("a library failed") from error
    except RuntimeError as outer:
        return outer


def test_each_class_of_environment_fault_is_said_as_such_never_as_a_bug(tmp_path):
    (tmp_path / "a-file").write_text("")
    # What cannot arise in this process (as root, without mounts, and no /dev/full on this machine kind) is made as the
    # OS raises it; the tests above meet each for real.
    full = OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    read_only = OSError(errno.EROFS, os.strerror(errno.EROFS), str(tmp_path / "ro"))
    forbidden = OSError(errno.EACCES, os.strerror(errno.EACCES), str(tmp_path / "forbidden"))
    faults = {
        "a disk is full": full,
        "the MLflow store's disk is full": RuntimeError("(sqlite3.OperationalError) database or disk is full"),
        f"cannot use {tmp_path / 'a-file' / 'x'}: a part of the path is a file": raised(
            lambda: open(tmp_path / "a-file" / "x", "w")),
        f"cannot use {tmp_path}: it is a directory": raised(lambda: open(tmp_path, "w")),
        f"cannot use {tmp_path / 'ro'}: its file system is read-only": read_only,
        f"cannot use {tmp_path / 'forbidden'}: permission denied": forbidden,
        "its host name does not resolve": raised(lambda: socket.getaddrinfo(NOWHERE_HOST, 80)),
    }
    for sentence, error in faults.items():
        assert sentence in problem(wrapped(error))
    assert problem(wrapped(ValueError("a bug"))) is None
