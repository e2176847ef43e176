import os
import shutil
import socket
import ssl
import subprocess
import sys
import time
import urllib.request
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest
from hypothesis import HealthCheck, settings

REPO = Path(__file__).resolve().parent.parent

# Property-based tests (Hypothesis): a few dozen inputs each in `make test`; `make test-slow` runs them with
# `--hypothesis-profile=slow`, many more.
settings.register_profile("fast", max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.register_profile("slow", max_examples=1000, deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.load_profile("fast")
TINY_CONFIG = REPO / "configs" / "tiny.yaml"
TINY_TEACHER = REPO / "tests" / "assets" / "tiny-teacher"


@pytest.fixture(autouse=True, scope="session")
def isolated_homes(tmp_path_factory):
    """Keep Prefect, MLflow and distilflow state of the test session out of the user's home."""
    home = tmp_path_factory.mktemp("homes")
    env = {"DISTILFLOW_HOME": str(home / "distilflow"), "PREFECT_HOME": str(home / "prefect"),
           "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
           # a temporary Prefect server has taken over 120 s to start on a busy 2-core machine
           "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "600",
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


# The tiny config's four stages, run once for the session in a workdir of their own (no Prefect, no MLflow). Runs are
# content-addressed: a test whose run starts with the same stages copies them into its workdir (`with_stages`), and
# its run reuses them and computes only what comes after (what it tests).

@pytest.fixture(scope="session")
def tiny_work(tmp_path_factory):
    from distilflow.configs.loader import load_config

    return load_config(TINY_CONFIG, {"run.workdir": str(tmp_path_factory.mktemp("tiny-stages"))})


@pytest.fixture(scope="session")
def tiny_prototype(tiny_work):
    from distilflow.tasks.stages import run_stage

    return run_stage("prototype", tiny_work)


@pytest.fixture(scope="session")
def tiny_distill(tiny_work, tiny_prototype):
    from distilflow.tasks.stages import run_stage

    return run_stage("distill", tiny_work, tiny_prototype)


@pytest.fixture(scope="session")
def tiny_compress(tiny_work, tiny_prototype, tiny_distill):
    from distilflow.tasks.stages import run_stage

    return run_stage("compress", tiny_work, tiny_prototype, tiny_distill)


def with_stages(workdir: Path, *finished) -> Path:
    """``workdir`` holding the ``finished`` stage outputs of the tiny config (`tiny_prototype`, ...), as a run there
    would have published them."""
    for output in finished:
        shutil.copytree(output.directory, workdir / "artifacts" / output.directory.parent.name / output.directory.name,
                        symlinks=True)
    return workdir


@pytest.fixture(scope="session")
def tiny_teacher():
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(TINY_TEACHER)
    model = AutoModelForCausalLM.from_pretrained(TINY_TEACHER, dtype=torch.float32).eval()
    return model, tokenizer


def tiny_model_with_its_own_tokenizer(directory: Path, vocab_size: int = 320) -> Path:
    """A random 2-layer Llama whose byte-level BPE vocabulary is trained here on the support tickets, so it
    tokenizes the same text differently from the tiny teacher (SmolLM2's tokenizer); chat template: the tiny
    teacher's. Built offline in about a second."""
    import json

    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    texts = [json.loads(line)["text"] for line in (REPO / "configs/data/support_tickets.jsonl").open()]
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    backend.train_from_iterator(texts, trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=["<|im_start|>", "<|im_end|>", "<pad>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<|im_start|>", eos_token="<|im_end|>",
                                        pad_token="<pad>")
    tokenizer.chat_template = AutoTokenizer.from_pretrained(TINY_TEACHER).chat_template
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=1, max_position_embeddings=512, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=True))
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


def write_config(tmp_path: Path, text: str, name: str = "config.yaml") -> Path:
    """A config file in tmp_path whose relative paths point into the repo's configs/ and tests/assets/."""
    path = tmp_path / name
    path.write_text(text.replace("@REPO@", str(REPO)))
    return path


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@dataclass(frozen=True)
class Server:
    base_url: str
    model: str
    api_key: str


SERVER_API_KEY = "test-key-not-a-secret"


@pytest.fixture(scope="session")
def openai_server(tmp_path_factory):
    """tests/openai_server.py serving the tiny teacher on 127.0.0.1 (real generation), stopped by its PID."""
    with serving(tmp_path_factory.mktemp("server")) as (server, _):
        yield server


@contextmanager
def serving(log_dir: Path, *flags: str, model: Path = TINY_TEACHER, name: str = "tiny-teacher", port: int | None = None,
            wait: bool = True):
    """tests/openai_server.py serving ``model`` as ``name`` on 127.0.0.1 (``flags`` as on its command line) until
    the block ends; yields the server and its process, stopped by its PID."""
    port = port or free_port()
    log = log_dir / f"server-{port}-{time.monotonic_ns()}.log"
    with open(log, "w") as out:
        process = subprocess.Popen(
            [sys.executable, str(REPO / "tests" / "openai_server.py"), "--model", str(model), "--port", str(port),
             "--served-model-name", name, "--api-key", SERVER_API_KEY, *flags], stdout=out, stderr=subprocess.STDOUT)
    base_url = f"http://127.0.0.1:{port}/v1"
    try:
        if wait:
            wait_until_serving(base_url, process, log)
        yield Server(base_url=base_url, model=name, api_key=SERVER_API_KEY), process
    finally:
        process.terminate()
        process.wait(timeout=30)


def wait_until_serving(base_url: str, process: subprocess.Popen, log: Path, timeout_s: float = 300,
                       insecure: bool = False) -> None:
    """Until the server at ``base_url`` answers (``insecure``: whatever its TLS certificate)."""
    context = ssl._create_unverified_context() if insecure else None
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"test server exited:\n{log.read_text()}")
        try:
            urllib.request.urlopen(urllib.request.Request(
                f"{base_url}/models", headers={"Authorization": f"Bearer {SERVER_API_KEY}"}), timeout=2,
                context=context)
            return
        except OSError:
            time.sleep(0.5)
    raise RuntimeError(f"test server not serving after {timeout_s} s:\n{log.read_text()}")
