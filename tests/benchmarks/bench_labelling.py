"""Benchmark: teacher labelling at scale (issue 26, item 4). Labels per second of a served teacher at 1, 8 and 64
requests in flight, and the hours 100,000 tickets would take at each.

The teacher is a GGUF served by llama.cpp (tasks/serving.py: the xllamacpp wheel's server in a process of its own
on 127.0.0.1, stopped by its PID, also on an error or Ctrl-C), one server per level with as many slots
(`n_parallel`) as requests in flight, so that none queue on the server. The client is distilflow's own HTTP
teacher (tasks/teachers.py, `max_concurrency` = the level): the code the prototype stage runs for
`prototype.teacher: {base_url: ...}`, with the demo's task and a 4-shot prompt from its labelled pool. The
unlabelled training tickets are labelled in order, `--requests` of them per level, after one warm-up request.

    python -m tests.benchmarks.bench_labelling --out OUT [--requests 128] [--concurrency 1 8 64] [--gguf PATH]

Writes OUT/labelling.json and prints it.
"""

import argparse
import json
import logging
import os
import platform
import time
from collections import Counter
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path

from distilflow.configs.loader import load_config
from distilflow.configs.schema import HttpTeacherConfig, PipelineConfig, ServingConfig
from distilflow.tasks import data, serving
from distilflow.tasks.errors import ServiceError
from distilflow.tasks.evaluate import Prompting
from distilflow.tasks.models import gguf_package_file
from distilflow.tasks.teachers import HttpTeacher
from tests.benchmarks.vllm_teacher import DEMO

LEVELS = (1, 8, 64)
TICKETS = 100_000
OPENAI_LOGGER = "openai._base_client"


def load_average() -> list[float]:
    """The machine's 1, 5 and 15-minute load: the cores are shared, and the rates depend on what else runs."""
    return [round(load, 2) for load in os.getloadavg()]


def demo_gguf(cfg: PipelineConfig) -> Path:
    """The GGUF file of the config's teacher (the demo's: SmolLM2-135M-Instruct, Q4_1, from its PyPI package)."""
    teacher = cfg.prototype.teacher
    return gguf_package_file(teacher.gguf_package, teacher.gguf_file, "prototype.teacher")


def workload(cfg: PipelineConfig, requests: int) -> tuple[list[dict], Prompting]:
    """The first ``requests`` unlabelled training tickets, and the prototype's first few-shot prompt (it ranks
    ``shot_candidates`` such prompts and keeps the best; every one has ``few_shot`` examples). Not calibrated: a
    teacher that answers by the server's guided choice never is."""
    split = data.load_task_data(cfg.task, cfg.run.seed)
    if requests > len(split.train):
        raise SystemExit(f"--requests {requests}: the task has only {len(split.train)} training tickets")
    shots = data.few_shot_examples(split.pool, cfg.task, cfg.prototype.few_shot, cfg.run.seed)
    return split.train[:requests], Prompting(tuple(shots), calibrate=False)


class RetryCounter(logging.Handler):
    """The retries the OpenAI client makes (distilflow's teacher leaves retrying to it), and what it met: a
    timeout, a connection error or an HTTP status, as it logs them (the last one of a request it gives up on too)."""

    def __init__(self):
        super().__init__(logging.DEBUG)
        self.count, self.causes = 0, Counter()

    def emit(self, record: logging.LogRecord) -> None:
        message = record.getMessage()
        if message.startswith("Retrying request"):
            self.count += 1
        elif message.startswith("Encountered a timeout"):
            self.causes["timeout"] += 1
        elif message.startswith("Encountered exception"):
            self.causes["connection error"] += 1
        elif message.startswith("Encountered an HTTP status error"):
            self.causes[f"HTTP {message.rsplit(' ', 1)[-1]}"] += 1


@contextmanager
def counted_retries() -> Iterator[RetryCounter]:
    """The OpenAI client's retries inside the block."""
    counter, logger = RetryCounter(), logging.getLogger(OPENAI_LOGGER)
    level = logger.level
    logger.addHandler(counter)
    logger.setLevel(logging.DEBUG)
    try:
        yield counter
    finally:
        logger.removeHandler(counter)
        logger.setLevel(level)


def label_at(gguf_file: Path, cfg: PipelineConfig, rows: list[dict], prompting: Prompting, concurrency: int,
             threads: int, timeout_s: float, max_retries: int) -> dict:
    """``rows`` labelled through the HTTP teacher ``concurrency`` at a time, against a llama.cpp server of
    ``gguf_file`` with ``concurrency`` slots started for this level alone."""
    engine = serving.Engine(serving.LLAMA_CPP, "cpu", threads=threads)
    with serving.serve(gguf_file, engine, ServingConfig(concurrency=concurrency)) as server:
        # llama.cpp lists the model by the path it loaded, which is what the teacher checks /models for.
        teacher = HttpTeacher.connect(HttpTeacherConfig(
            base_url=server.base_url, model=str(gguf_file), max_concurrency=concurrency, timeout_s=timeout_s,
            max_retries=max_retries), api_key=None)
        teacher.answer(rows[:1], cfg.task, prompting)  # the first request pays one-off costs
        load_before = load_average()
        answers, error = [], None
        with counted_retries() as retries:
            start = time.perf_counter()
            try:
                answers = [samples[0] for samples in teacher.answer(rows, cfg.task, prompting)]
            except ServiceError as err:  # after the client's retries: the level failed, the others still run
                error = str(err)
            seconds = time.perf_counter() - start
        load_after = load_average()
    rate = len(answers) / seconds if answers else 0.0
    return {"concurrency": concurrency, "server_slots": concurrency, "threads": threads, "requests": len(rows),
            "seconds": round(seconds, 2), "labels": len(answers), "labels_per_s": round(rate, 3),
            "s_per_label": round(1 / rate, 3) if rate else None,
            "hours_for_100000_tickets": round(TICKETS / rate / 3600, 2) if rate else None,
            "valid_labels": sum(answer in cfg.task.check.choices for answer in answers),
            "failures": len(rows) - len(answers), "retries": retries.count,
            "retry_causes": dict(retries.causes), "error": error,
            "choice_method": teacher.choice_method, "load_before": load_before, "load_after": load_after,
            "server_peak_memory_mb": server.peak_memory_mb}


def measure(gguf_file: Path, cfg: PipelineConfig, requests: int, levels: Sequence[int] = LEVELS,
            threads: int | None = None, timeout_s: float | None = None, max_retries: int | None = None) -> dict:
    """Labelling throughput of ``gguf_file`` as ``cfg``'s teacher at each level of requests in flight. Timeout and
    retries default to `prototype.teacher`'s (HttpTeacherConfig)."""
    defaults = HttpTeacherConfig.model_fields
    timeout_s = defaults["timeout_s"].default if timeout_s is None else timeout_s
    max_retries = defaults["max_retries"].default if max_retries is None else max_retries
    threads = threads or len(os.sched_getaffinity(0))
    rows, prompting = workload(cfg, requests)
    started, load_before = datetime.now(timezone.utc).isoformat(timespec="seconds"), load_average()
    measured = [label_at(gguf_file, cfg, rows, prompting, level, threads, timeout_s, max_retries) for level in levels]
    return {"benchmark": "labelling", "date": started,
            "model": gguf_file.name, "gguf_bytes": gguf_file.stat().st_size,
            "device": {"machine": platform.machine(), "cpus": len(os.sched_getaffinity(0))},
            "server": "llama.cpp (xllamacpp), one server per level, n_parallel = requests in flight",
            "task": {"choices": cfg.task.check.choices, "few_shot": len(prompting.shots),
                     "max_answer_tokens": cfg.task.max_answer_tokens},
            "client": {"timeout_s": timeout_s, "max_retries": max_retries},
            "load_before": load_before, "load_after": load_average(), "levels": measured,
            "hours_for_100000_tickets": {str(m["concurrency"]): m["hours_for_100000_tickets"] for m in measured}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--requests", type=int, default=128, help="tickets labelled at each level")
    parser.add_argument("--concurrency", type=int, nargs="+", default=list(LEVELS), help="requests in flight")
    parser.add_argument("--gguf", type=Path, help="the teacher's GGUF (default: the demo's embedded teacher)")
    parser.add_argument("--config", type=Path, default=DEMO, help="the task and prompt (default: the demo's)")
    parser.add_argument("--timeout-s", type=float, help="per request (default: prototype.teacher.timeout_s's)")
    args = parser.parse_args()
    cfg = load_config(args.config)
    result = measure(args.gguf or demo_gguf(cfg), cfg, args.requests, args.concurrency, timeout_s=args.timeout_s)
    args.out.mkdir(parents=True, exist_ok=True)
    text = json.dumps(result, indent=1)
    (args.out / "labelling.json").write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
