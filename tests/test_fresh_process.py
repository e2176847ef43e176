"""Work in a new Python process: a JSON request in, a JSON answer out, the process's error when it fails."""

import subprocess

import pytest

from distilflow.tasks import fresh_process


def test_a_failed_process_raises_with_its_stderr():
    with pytest.raises(subprocess.CalledProcessError) as failed:
        fresh_process.call("distilflow.no_such_module", {"x": 1})
    assert "No module named distilflow.no_such_module" in failed.value.stderr
