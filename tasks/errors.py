"""The one error type distilflow raises for problems a user can fix; the CLI exits 2 on it."""


class DistilflowError(Exception):
    """A problem with the user's config, data or model files. The message says where and what to do."""

    exit_code = 2
