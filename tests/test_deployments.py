"""The pipeline's deployment, its `distilflow serve` command and the retry policy, without a server."""

import subprocess
import sys
from pathlib import Path

import httpx
import httpx2
import openai
import pytest
import requests
from prefect.client.schemas.objects import ConcurrencyLimitStrategy
from prefect.settings import PREFECT_API_URL, temporary_settings

from distilflow.configs.loader import load_config
from distilflow.flows.cli import main
from distilflow.flows.deployments import pipeline_deployment
from distilflow.flows.retries import is_transient
from distilflow.tasks.errors import DistilflowError, ServiceError
from tests.conftest import REPO, TINY_CONFIG

NOWHERE = "http://127.0.0.1:9/api"  # a Prefect API URL nothing answers: these commands fail before using it


def deployment_for(**overrides):
    return pipeline_deployment(TINY_CONFIG, {"distill.lora.r": 2}, load_config(TINY_CONFIG, overrides))


def test_deployment_is_named_after_the_run_by_default():
    assert deployment_for().name == "tiny"


def test_deployment_name_comes_from_the_schedule_section():
    assert deployment_for(**{"schedule.deployment": "nightly"}).name == "nightly"


def test_deployment_runs_the_config_with_its_overrides():
    deployment = deployment_for()
    assert deployment.parameters == {"config_path": str(TINY_CONFIG), "overrides": {"distill.lora.r": 2}}
    assert deployment.entrypoint == "distilflow.flows.pipeline.pipeline"


def test_deployment_has_the_cron_of_the_schedule_section():
    deployment = deployment_for(**{"schedule.cron": "0 2 * * *", "schedule.timezone": "Europe/Berlin"})
    [schedule] = deployment.schedules
    assert (schedule.schedule.cron, schedule.schedule.timezone) == ("0 2 * * *", "Europe/Berlin")


def test_deployment_without_a_cron_has_no_schedule():
    assert not deployment_for().schedules


def test_deployment_allows_one_run_at_a_time_and_enqueues_the_next_by_default():
    deployment = deployment_for()
    assert deployment.concurrency_limit == 1
    assert deployment.concurrency_options.collision_strategy == ConcurrencyLimitStrategy.ENQUEUE


def test_collision_strategy_cancel_new_refuses_a_second_run():
    options = deployment_for(**{"schedule.collision_strategy": "cancel_new"}).concurrency_options
    assert options.collision_strategy == ConcurrencyLimitStrategy.CANCEL_NEW


def serve_error(capsys, *args, api_url=NOWHERE) -> str:
    with temporary_settings({PREFECT_API_URL: api_url}):
        assert main(["serve", str(TINY_CONFIG), *args]) == 2
    return capsys.readouterr().err


def test_serve_without_a_prefect_server_says_how_to_start_one(capsys):
    message = serve_error(capsys, api_url=None)
    assert "prefect server start" in message and "PREFECT_API_URL" in message


def test_serve_with_a_bad_cron_names_the_key_and_the_config(capsys):
    message = serve_error(capsys, "--cron", "0 2 * *")
    assert str(TINY_CONFIG) in message and "schedule.cron: Invalid cron string" in message


def test_serve_with_an_unknown_time_zone_names_the_key(capsys):
    message = serve_error(capsys, "--cron", "0 2 * * *", "--set", "schedule.timezone=Mars/Olympus")
    assert "schedule.timezone" in message


def test_unknown_collision_strategy_is_a_config_error(capsys):
    message = serve_error(capsys, "--set", "schedule.collision_strategy=drop")
    assert "schedule.collision_strategy" in message and "'enqueue' or 'cancel_new'" in message


def raised_from(cause: BaseException) -> BaseException:
    """``RuntimeError`` raised from ``cause``, as client libraries wrap the error underneath."""
    try:
        raise RuntimeError("wrapped") from cause
    except RuntimeError as wrapped:
        return wrapped


def http_status_error(status: int) -> httpx.HTTPStatusError:
    request = httpx.Request("POST", "http://teacher/v1/chat/completions")
    return httpx.HTTPStatusError("status", request=request, response=httpx.Response(status, request=request))


def served_teacher_error(status: int | None) -> ServiceError:
    """What the HTTP teacher raises once its client gives up: on a dropped connection (None) or an HTTP status."""
    request = httpx2.Request("POST", "http://teacher/v1/completions")
    cause = openai.APIConnectionError(request=request) if status is None else \
        openai.APIStatusError("status", response=httpx2.Response(status, request=request), body=None)
    try:
        raise ServiceError("prototype.teacher: failed") from cause
    except ServiceError as error:
        return error


@pytest.mark.parametrize("error", [
    ConnectionRefusedError(111, "Connection refused"),
    TimeoutError("timed out"),
    requests.ConnectionError("Max retries exceeded"),
    httpx.ConnectError("connection refused"),
    http_status_error(503),
    http_status_error(429),
    raised_from(ConnectionResetError(104, "Connection reset by peer")),
    served_teacher_error(None),
    served_teacher_error(503),
], ids=["refused", "timeout", "requests", "httpx", "http-503", "http-429", "cause", "teacher-dropped", "teacher-503"])
def test_transient_failures_are_retried(error):
    assert is_transient(error)


@pytest.mark.parametrize("error", [
    DistilflowError("prototype.teacher: cannot load"),
    ValueError("shape mismatch"),
    FileNotFoundError("model.safetensors"),
    http_status_error(400),
    http_status_error(404),
    served_teacher_error(400),
], ids=["config-error", "bug", "missing-file", "http-400", "http-404", "teacher-400"])
def test_other_failures_are_not_retried(error):
    assert not is_transient(error)


def test_config_error_raised_from_a_network_error_is_not_retried():
    try:
        raise DistilflowError("MLflow tracking server does not answer") from ConnectionRefusedError()
    except DistilflowError as err:
        assert not is_transient(err)


def test_runner_image_dockerfile_passes_hadolint():
    hadolint = Path(sys.executable).with_name("hadolint")
    done = subprocess.run([str(hadolint), str(REPO / "docker" / "pipeline.Dockerfile")],
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr


@pytest.mark.parametrize("command", ["run", "serve"])
def test_a_prefect_api_that_does_not_answer_is_named_before_anything_starts(capsys, tmp_path, command):
    with temporary_settings({PREFECT_API_URL: NOWHERE}):
        assert main([command, str(TINY_CONFIG), "--set", f"run.workdir={tmp_path / 'work'}"]) == 2
    error = capsys.readouterr().err
    assert f"the Prefect API {NOWHERE} (PREFECT_API_URL) does not answer" in error and "Traceback" not in error
    assert not (tmp_path / "work" / "artifacts").exists()
