"""Which failures a retry can fix: the retry policy of the pipeline's tasks (stages, MLflow calls)."""

import httpx
import openai
import requests

from distilflow.configs.schema import PipelineConfig
from distilflow.tasks.errors import DistilflowError, ServiceError

# Failures that waiting can fix: a refused or dropped connection, a timeout, a server saying "busy, later".
# (The openai client's connection error also covers a server that hung up mid-answer, which its HTTP
# library reports as a protocol error, not a network one.)
TRANSIENT_ERRORS = (ConnectionError, TimeoutError, httpx.NetworkError, httpx.TimeoutException,
                    requests.ConnectionError, requests.Timeout, requests.exceptions.RetryError,
                    openai.APIConnectionError)
TRANSIENT_HTTP_STATUS = {408, 425, 429, 500, 502, 503, 504}


def is_transient(error: BaseException) -> bool:
    """Whether ``error`` (or an error it was raised from) is transient. A DistilflowError is not: it needs
    the user to fix a config, data or model file, and a retry would only repeat it; a ServiceError (an
    HTTP teacher that failed) is as transient as the client error it was raised from."""
    while error is not None:
        if isinstance(error, DistilflowError) and not isinstance(error, ServiceError):
            return False
        if isinstance(error, TRANSIENT_ERRORS) or _http_status(error) in TRANSIENT_HTTP_STATUS:
            return True
        error = error.__cause__ or error.__context__
    return False


def _http_status(error: BaseException) -> int | None:
    """The HTTP status of an HTTP client's error (httpx, requests, openai), if it carries one."""
    status = getattr(error, "status_code", None)
    response = getattr(error, "response", None)
    return status if isinstance(status, int) else getattr(response, "status_code", None)


def retry_if_transient(task, task_run, state) -> bool:
    """Prefect's ``retry_condition_fn``: called with the failed state, says whether to retry."""
    return is_transient(state.result(raise_on_failure=False))


def retried(work, cfg: PipelineConfig):
    """``work`` (a task) with the run's retry policy for transient failures."""
    return work.with_options(retries=cfg.run.retries, retry_delay_seconds=cfg.run.retry_delay_seconds)
