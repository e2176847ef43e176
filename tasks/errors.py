"""The one error type distilflow raises for problems a user can fix; the CLI exits 2 on it."""


class DistilflowError(Exception):
    """A problem with the user's config, data or model files. The message says where and what to do."""

    exit_code = 2


class ServiceError(DistilflowError):
    """A service the run talks to (an HTTP teacher) failed after its client's own retries.

    Raised *from* the client's error: that cause says whether waiting can help (a refused or dropped
    connection, a timeout, HTTP 408/429/5xx), so the pipeline's stage retries see it; the message says
    what to check if the retries run out too.
    """
