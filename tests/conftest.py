import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
TINY_CONFIG = REPO / "configs" / "tiny.yaml"
TINY_TEACHER = REPO / "tests" / "assets" / "tiny-teacher"


@pytest.fixture(autouse=True, scope="session")
def isolated_homes(tmp_path_factory):
    """Keep Prefect, MLflow and distilflow state of the test session out of the user's home."""
    home = tmp_path_factory.mktemp("homes")
    env = {"DISTILFLOW_HOME": str(home / "distilflow"), "PREFECT_HOME": str(home / "prefect"),
           "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "120",
           "PREFECT_LOGGING_EXTRA_LOGGERS": "distilflow", "PREFECT_LOGGING_TO_API_WHEN_MISSING_FLOW": "ignore",
           "TOKENIZERS_PARALLELISM": "false"}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    os.environ.pop("MLFLOW_TRACKING_URI", None)
    yield
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


@pytest.fixture
def tiny_cfg(tmp_path):
    from distilflow.configs.loader import load_config

    return load_config(TINY_CONFIG, {"run.workdir": str(tmp_path / "work")})


@pytest.fixture(scope="session")
def tiny_teacher():
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(TINY_TEACHER)
    model = AutoModelForCausalLM.from_pretrained(TINY_TEACHER, dtype=torch.float32).eval()
    return model, tokenizer


def write_config(tmp_path: Path, text: str, name: str = "config.yaml") -> Path:
    """A config file in tmp_path whose relative paths point into the repo's configs/ and tests/assets/."""
    path = tmp_path / name
    path.write_text(text.replace("@REPO@", str(REPO)))
    return path
