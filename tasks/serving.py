"""Serving measurements: each model state served the way users serve it, measured as a client sees it.

The engine is llama.cpp on CPUs (the `xllamacpp` wheel's server, on a GGUF file) or vLLM's OpenAI server on
a GPU (on a checkpoint directory), where vllm is importable. Each measurement starts a real server in a
process of its own on 127.0.0.1, asks it over HTTP with the OpenAI client, and stops it by its PID; its peak
memory is that process's. Per state: batch-1 decode speed and time to first token, p50/p95 latency of task
requests sent one at a time, output tokens/s at `eval.serving.concurrency` requests in flight, peak memory,
and the task score on the whole held-out split with the constraint a client's request.json carries. The
prices in `deploy.cost` turn the speeds into dollars per million output tokens.
"""

import functools
import importlib.util
import json
import logging
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from distilflow.configs.schema import CostConfig, ServingConfig, TaskConfig
from distilflow.tasks import data, fresh_process, package
from distilflow.tasks.errors import DistilflowError
from distilflow.tasks.evaluate import task_score

log = logging.getLogger("distilflow")

SERVING_FIELDS = ("engine", "device", "artifact", "artifact_bytes", "batch1_tokens_per_s", "ttft_s", "latency_p50_s",
                  "latency_p95_s", "concurrency", "throughput_tokens_per_s", "peak_memory_mb", "task_score")
LLAMA_CPP, VLLM = "llama.cpp", "vllm"
# The packages of a vLLM installed in an environment of its own: the vLLM server's PYTHONPATH.
VLLM_PYTHONPATH = "DISTILFLOW_VLLM_PYTHONPATH"


@dataclass(frozen=True)
class Engine:
    """A serving engine on a device, and the price of the hardware it ran on."""

    name: str
    device: str
    device_kind: str = ""
    usd_per_hour: float | None = None
    threads: int | None = None


def choose_engine(cfg: ServingConfig, device_type: str) -> Engine | None:
    """The engine the bundle targets on this run's device: vLLM on a GPU where vllm is importable, else
    llama.cpp on the CPU; None when eval.serving.engine is none."""
    vllm_installed = importlib.util.find_spec("vllm") is not None or VLLM_PYTHONPATH in os.environ
    name = cfg.engine if cfg.engine != "auto" else VLLM if device_type == "cuda" and vllm_installed else LLAMA_CPP
    if name == "none":
        return None
    if name == VLLM and device_type != "cuda":
        raise DistilflowError("eval.serving.engine is vllm, which needs a GPU (run.device: cuda); use auto or llama.cpp")
    if name == VLLM:
        import torch

        return Engine(VLLM, "cuda", device_kind=device_kind(torch.cuda.get_device_name()))
    return Engine(LLAMA_CPP, "cpu", device_kind="cpu", threads=cfg.threads or len(os.sched_getaffinity(0)))


def device_kind(device_name: str) -> str:
    """'NVIDIA H100 80GB HBM3' -> 'nvidia-h100-80gb-hbm3'."""
    return "-".join("".join(c if c.isalnum() else " " for c in device_name.lower()).split())


def priced(engine: Engine, cost: CostConfig) -> Engine:
    """``engine`` with its hourly price from deploy.cost: per vCPU (times the threads it uses) on a CPU,
    per GPU on a GPU. A device kind with no price is an error naming deploy.cost."""
    kind = cost.device_kind or engine.device_kind
    # 'nvidia-h100' prices 'nvidia-h100-80gb-hbm3', never 'nvidia-h1000': the longest key that ends at a dash.
    keys = [key for key in cost.usd_per_hour if kind == key or kind.startswith(key + "-")]
    if not keys:
        raise DistilflowError(
            f"deploy.cost: no price for this run's device kind {kind!r} (priced: {', '.join(sorted(cost.usd_per_hour))}); "
            f"add it, e.g. --set deploy.cost.usd_per_hour.{kind}=PRICE_PER_HOUR, or name a priced kind in "
            "deploy.cost.device_kind")
    unit_price = cost.usd_per_hour[max(keys, key=len)]
    units = engine.threads if engine.name == LLAMA_CPP else 1
    return Engine(engine.name, engine.device, kind, unit_price * units, engine.threads)


def usd_per_mtok(usd_per_hour: float | None, tokens_per_s: float | None) -> float | None:
    """Dollars per million output tokens of a machine at ``usd_per_hour`` producing ``tokens_per_s``, busy
    all the time."""
    if usd_per_hour is None or not tokens_per_s:
        return None
    return usd_per_hour / 3600 / tokens_per_s * 1e6


def cost_entry(serving: dict) -> dict:
    """The journey's ``cost_usd_per_mtok``: at batch 1 and at the measured throughput."""
    price = serving.get("usd_per_hour")
    return {"batch1": usd_per_mtok(price, serving.get("batch1_tokens_per_s")),
            "throughput": usd_per_mtok(price, serving.get("throughput_tokens_per_s"))}


def request_cost_entry(serving: dict) -> dict:
    """The journey's ``cost_usd_per_1k_requests``: a task request as its clients send it (the teacher's few-shot
    prompt, a student's bare one) and its answer; one at a time (the median latency) and at the measured rate of
    task requests in flight."""
    price = serving.get("usd_per_hour")
    if price is None:
        return {"batch1": None, "throughput": None}
    latency, rate = serving.get("latency_p50_s"), serving.get("task_requests_per_s")
    return {"batch1": price / 3600 * latency * 1000 if latency else None,
            "throughput": price / 3600 / rate * 1000 if rate else None}


def cpu_price(cost: CostConfig, threads: int) -> float:
    """What ``threads`` vCPUs cost per hour at deploy.cost's `cpu` price (a model served in-process on the CPU)."""
    return cost.usd_per_hour["cpu"] * threads


def not_measured(engine: Engine | None, why: str) -> dict:
    """The serving fields of a state that was not served, with the reason (never a made-up number)."""
    return {**dict.fromkeys(SERVING_FIELDS), "engine": engine and engine.name, "device": engine and engine.device,
            "not_measured": why}


# --- the requests ------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Workload:
    """What a state is asked: held-out task requests as its clients send them, and what to score them by."""

    rows: list[dict]
    task: TaskConfig
    shots: tuple[dict, ...] = ()

    def chats(self, rows: list[dict]) -> list[list[dict]]:
        return [data.messages(row, self.task, self.shots) for row in rows]

    def task_request(self, chat: list[dict], engine: str) -> dict:
        """A chat request as request.json writes it: greedy, constrained to the task's form where it has one."""
        constraint = package.llama_cpp_constraint(self.task.check) if engine == LLAMA_CPP \
            else package.vllm_constraint(self.task.check)
        return {"messages": chat, "temperature": 0, "max_tokens": self.task.max_answer_tokens, **constraint}


def speed_request(chat: list[dict], tokens: int) -> dict:
    """A request that decodes exactly ``tokens`` tokens (end of sequence ignored), for speed."""
    return {"messages": chat, "temperature": 0, "max_tokens": tokens, "ignore_eos": True}


# --- measuring -----------------------------------------------------------------------------------------

def measure(artifact: Path, engine: Engine, workload: Workload, cfg: ServingConfig) -> dict:
    """Serve ``artifact`` with ``engine`` and measure it: the journey's ``serving`` fields, and the engine's
    ``answers`` to the held-out requests."""
    start = time.perf_counter()
    with serve(artifact, engine, cfg) as server:
        measured = measure_served(Client(server.base_url, server.model), engine, workload, cfg)
    measured.update({"artifact": artifact.name, "artifact_bytes": artifact_bytes(artifact),
                     "peak_memory_mb": server.peak_memory_mb, "seconds": time.perf_counter() - start})
    measured = {**{key: measured[key] for key in SERVING_FIELDS}, **measured}  # the contract's order first
    log.info("serving %s with %s: %.1f tokens/s at batch 1, %.1f at %d in flight, task score %.3f (%.0f s)",
             artifact.name, engine.name, measured["batch1_tokens_per_s"], measured["throughput_tokens_per_s"],
             cfg.concurrency, measured["task_score"], measured["seconds"])
    return measured


def measure_served(client: "Client", engine: Engine, workload: Workload, cfg: ServingConfig) -> dict:
    """The measurements a running server answers: speed, latency, throughput, the task score."""
    chats = workload.chats(workload.rows)
    client.chat(speed_request(chats[0], 2))  # warm-up: the first request pays one-off costs
    speeds = [client.stream(speed_request(chats[0], cfg.decode_tokens)) for _ in range(cfg.speed_repeats)]
    latencies = [client.timed(workload.task_request(chat, engine.name))[1] for chat in chats[:cfg.latency_requests]]
    throughput = client.throughput([speed_request(chats[i % len(chats)], cfg.decode_tokens)
                                    for i in range(cfg.concurrency)], cfg.concurrency)
    started = time.perf_counter()
    answers = client.answers([workload.task_request(chat, engine.name) for chat in chats], cfg.concurrency)
    task_requests_per_s = len(answers) / (time.perf_counter() - started)
    return {"engine": engine.name, "device": engine.device,
            "batch1_tokens_per_s": statistics.median(s["decode_tokens_per_s"] for s in speeds),
            "ttft_s": statistics.median(s["ttft_s"] for s in speeds),
            "latency_p50_s": percentile(latencies, 50), "latency_p95_s": percentile(latencies, 95),
            "concurrency": cfg.concurrency, "throughput_tokens_per_s": throughput,
            "task_score": task_score(answers, workload.rows, workload.task), "task_requests": len(answers),
            "task_requests_per_s": task_requests_per_s,
            "latency_requests": len(latencies), "decode_tokens": cfg.decode_tokens,
            "device_kind": engine.device_kind, "usd_per_hour": engine.usd_per_hour, "threads": engine.threads,
            "answers": answers}


def smoke(gguf_file: Path, rows: list[dict], task: TaskConfig, max_tokens: int, cfg: ServingConfig,
          constraint: dict | None = None) -> list[str]:
    """Answers of the GGUF through llama.cpp's server to ``rows`` by greedy generation, free or under
    ``constraint`` (``package.llama_cpp_constraint``)."""
    engine = Engine(LLAMA_CPP, "cpu", threads=cfg.threads or len(os.sched_getaffinity(0)))
    with serve(gguf_file, engine, cfg) as server:
        requests = [{"messages": chat, "temperature": 0, "max_tokens": max_tokens, **(constraint or {})}
                    for chat in Workload(rows, task).chats(rows)]
        return Client(server.base_url, server.model).answers(requests, 1)


def artifact_bytes(artifact: Path) -> int:
    """A GGUF file's bytes, or a checkpoint directory's weight files'."""
    return artifact.stat().st_size if artifact.is_file() else sum(f.stat().st_size for f in artifact.rglob("*.safetensors"))


def percentile(values: list[float], q: float) -> float:
    """The q-th percentile, interpolated between the closest ranks (numpy's default)."""
    ordered = sorted(values)
    rank = (len(ordered) - 1) * q / 100
    low = int(rank)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


class Client:
    """An OpenAI client of the server, as an application would use it."""

    def __init__(self, base_url: str, model: str, timeout_s: float = 600):
        from openai import OpenAI

        self.openai, self.model = OpenAI(base_url=base_url, api_key="none", timeout=timeout_s, max_retries=0), model

    def chat(self, request: dict):
        from openai import BadRequestError

        body = {k: v for k, v in request.items() if k not in ("messages", "max_tokens", "temperature")}
        try:
            return self.openai.chat.completions.create(
                model=self.model, messages=request["messages"], max_tokens=request["max_tokens"],
                temperature=request["temperature"], extra_body=body, stream=request.get("stream", False),
                **({"stream_options": {"include_usage": True}} if request.get("stream") else {}))
        except BadRequestError as err:
            raise DistilflowError(f"the serving engine refused a request ({err.message}); if the prompt is longer "
                                  "than its context, raise eval.serving.context_tokens") from None

    def timed(self, request: dict) -> tuple[str, float]:
        start = time.perf_counter()
        answer = self.chat(request).choices[0].message.content or ""
        return answer.strip(), time.perf_counter() - start

    def stream(self, request: dict) -> dict:
        """Time to the first generated text and decode speed after it, from the streamed answer."""
        start = time.perf_counter()
        first, tokens = None, None
        for chunk in self.chat({**request, "stream": True}):
            if first is None and chunk.choices and chunk.choices[0].delta.content:
                first = time.perf_counter()
            if chunk.usage:
                tokens = chunk.usage.completion_tokens
        end = time.perf_counter()
        return {"ttft_s": first - start, "decode_tokens_per_s": (tokens - 1) / (end - first), "tokens": tokens}

    def throughput(self, requests: list[dict], in_flight: int) -> float:
        """Output tokens per second over ``requests`` sent ``in_flight`` at a time."""
        start = time.perf_counter()
        with ThreadPoolExecutor(in_flight) as pool:
            tokens = sum(pool.map(lambda r: self.chat(r).usage.completion_tokens, requests))
        return tokens / (time.perf_counter() - start)

    def answers(self, requests: list[dict], in_flight: int) -> list[str]:
        with ThreadPoolExecutor(in_flight) as pool:
            return [answer for answer, _ in pool.map(self.timed, requests)]


# --- servers -------------------------------------------------------------------------------------------

@dataclass
class Server:
    base_url: str
    model: str
    pid: int
    peak_memory_mb: float | None = None


@contextmanager
def serve(artifact: Path, engine: Engine, cfg: ServingConfig) -> Iterator[Server]:
    """A server of ``artifact`` on 127.0.0.1 in a process of its own, stopped by its PID on exit; the
    server's ``peak_memory_mb`` is set once it has stopped."""
    launch = _llama_cpp_server if engine.name == LLAMA_CPP else _vllm_server
    with launch(artifact, engine, cfg) as server:
        yield server


@contextmanager
def _llama_cpp_server(gguf_file: Path, engine: Engine, cfg: ServingConfig) -> Iterator[Server]:
    """`python -m distilflow.tasks.llama_cpp_server SETTINGS` (see there)."""
    settings = {"model": str(gguf_file), "n_parallel": cfg.concurrency, "n_ctx": cfg.concurrency * cfg.context_tokens,
                "threads": engine.threads}
    with tempfile.TemporaryFile("w+") as logs:
        process = subprocess.Popen([sys.executable, "-m", "distilflow.tasks.llama_cpp_server", json.dumps(settings)],
                                   stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=logs, text=True,
                                   env=engine_environment(), preexec_fn=fresh_process.end_with_parent)
        try:
            ready = _first_line(process, cfg.startup_timeout_s)
            if ready is None:
                process.wait(timeout=60)
                raise DistilflowError(f"{gguf_file}: llama.cpp refused to load this GGUF file ({_tail(logs)}); "
                                      "export it again (deploy.gguf) or replace it")
            server = Server(json.loads(ready)["address"] + "/v1", gguf_file.name, process.pid)
            yield server
            process.stdin.close()
            server.peak_memory_mb = json.loads(process.stdout.readline())["peak_memory_mb"]
            try:
                process.wait(timeout=SHUTDOWN_GRACE_S)
            except subprocess.TimeoutExpired:
                # Seen with xllamacpp stopped right after it started (before any request): its threads never
                # join. Everything was measured by now; the process is stopped by its PID below.
                log.info("llama.cpp server %d did not exit %d s after its stdin closed: killed", process.pid,
                         SHUTDOWN_GRACE_S)
        finally:
            _stop(process)


SHUTDOWN_GRACE_S = 10


def _first_line(process: subprocess.Popen, timeout_s: float) -> str | None:
    """The process's first line of output, or None when it exits (or times out) before writing one."""
    import selectors

    with selectors.DefaultSelector() as selector:
        selector.register(process.stdout, selectors.EVENT_READ)
        if not selector.select(timeout_s):
            return None
    return process.stdout.readline() or None


def _tail(logs, lines: int = 4) -> str:
    logs.seek(0)
    return " | ".join(line.strip() for line in logs.read().splitlines()[-lines:]) or "no output"


def _stop(process: subprocess.Popen) -> None:
    if process.poll() is None:
        process.kill()
        process.wait(timeout=60)


@contextmanager
def _vllm_server(model_dir: Path, engine: Engine, cfg: ServingConfig) -> Iterator[Server]:
    """vLLM's OpenAI server on the checkpoint, with KV cache for concurrency x context_tokens (by default
    vLLM takes 90% of the GPU). Its peak memory is the GPU memory it holds once it has served (weights, KV
    cache, CUDA graphs: vLLM allocates them up front), measured as the device's used memory before and after."""
    import torch

    port = _free_port()
    kv_cache_bytes = cfg.concurrency * cfg.context_tokens * kv_bytes_per_token(model_dir)
    command = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(model_dir),
               "--served-model-name", model_dir.name, "--host", "127.0.0.1", "--port", str(port),
               "--max-model-len", str(cfg.context_tokens), "--max-num-seqs", str(cfg.concurrency),
               "--kv-cache-memory-bytes", str(kv_cache_bytes), "--generation-config", "vllm"]
    free, total = torch.cuda.mem_get_info()
    used_before = total - free
    with tempfile.TemporaryFile("w+") as logs:
        # SIGTERM, not SIGKILL: vLLM's API server stops its engine-core processes on the way out.
        process = subprocess.Popen(command, stdout=logs, stderr=subprocess.STDOUT, text=True, env=vllm_environment(),
                                   preexec_fn=functools.partial(fresh_process.end_with_parent, signal.SIGTERM))
        try:
            _wait_for_health(f"http://127.0.0.1:{port}/health", process, logs, model_dir, cfg.startup_timeout_s)
            server = Server(f"http://127.0.0.1:{port}/v1", model_dir.name, process.pid)
            yield server
            free, total = torch.cuda.mem_get_info()
            server.peak_memory_mb = (total - free - used_before) / 1e6
            process.terminate()
            process.wait(timeout=120)
        finally:
            _stop(process)


def engine_environment(environ=os.environ) -> dict[str, str]:
    """A server's environment: this one without OMP_WAIT_POLICY, so the engine runs with its own threading
    defaults, as it does started on its own. The pipeline sets PASSIVE for torch (flows/cli.py); llama.cpp's
    OpenMP threads then sleep at each of the many barriers of a decode step: batch 1 ran at half speed."""
    return {key: value for key, value in environ.items() if key != "OMP_WAIT_POLICY"}


def vllm_environment(environ=os.environ) -> dict[str, str]:
    """The vLLM server's environment: ``engine_environment``, with VLLM_PYTHONPATH's value as its PYTHONPATH
    for vLLM installed in an environment of its own (its pins conflict with llm-compressor's)."""
    own = environ.get(VLLM_PYTHONPATH)
    return {**engine_environment(environ), **({"PYTHONPATH": own} if own else {})}


def kv_bytes_per_token(model_dir: Path) -> int:
    """Bytes of 16-bit keys and values one token holds in every layer."""
    config = package.checkpoint_config(model_dir)
    head_dim = config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"]
    kv_heads = config.get("num_key_value_heads") or config["num_attention_heads"]
    return 2 * config["num_hidden_layers"] * kv_heads * head_dim * 2


def _free_port() -> int:
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _wait_for_health(url: str, process: subprocess.Popen, logs, model_dir: Path, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise DistilflowError(f"{model_dir}: vLLM refused to serve this checkpoint ({_tail(logs)})")
        try:
            with urllib.request.urlopen(url, timeout=5):
                return
        except OSError:
            time.sleep(2)
    raise DistilflowError(f"{model_dir}: vLLM did not start within eval.serving.startup_timeout_s "
                          f"({timeout_s:g} s); raise it ({_tail(logs)})")
