"""The teacher, whatever it is: a model loaded here (white-box: weights and logits) or an
OpenAI-compatible HTTP endpoint such as vLLM, Ollama or a hosted API (black-box: text only).

Both answer chats in the form the task's check asks for and measure their own task score on the
held-out split; only a white-box teacher can be saved for logit distillation or pruned into a student.
"""

import os
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager

import torch
from tqdm.auto import tqdm

from distilflow.configs.schema import EvalConfig, HttpTeacherConfig, LocalTeacherConfig, TaskConfig
from distilflow.tasks import data, decoding
from distilflow.tasks.errors import DistilflowError
from distilflow.tasks.evaluate import Evaluation, Prompting, evaluate, score_answers
from distilflow.tasks.models import load_teacher


def open_teacher(cfg: LocalTeacherConfig | HttpTeacherConfig, device: torch.device,
                 key: str = "prototype.teacher") -> "LocalTeacher | HttpTeacher":
    """The teacher ``cfg`` describes, ready to answer; ``key`` names its config in errors."""
    if isinstance(cfg, HttpTeacherConfig):
        return HttpTeacher.connect(cfg, api_key(cfg, os.environ, key), key)
    model, tokenizer = load_teacher(cfg, device, key)
    return LocalTeacher(model, tokenizer, name=cfg.label)


def api_key(cfg: HttpTeacherConfig, environ, key: str = "prototype.teacher") -> str | None:
    """The API key from the environment variable the config names (never from the config itself)."""
    if cfg.api_key_env is None:
        return None
    value = environ.get(cfg.api_key_env, "")
    if not value:
        raise DistilflowError(f"{key}.api_key_env: environment variable {cfg.api_key_env} is not set; "
                              f"export {cfg.api_key_env}=<your API key> before running (the key is read only "
                              "from the environment, never from the config)")
    return value


class LocalTeacher:
    """A teacher whose weights are in memory: constrained choice by log-likelihood, logits for KD."""

    black_box = False

    def __init__(self, model, tokenizer, name: str):
        self.model, self.tokenizer, self.name = model, tokenizer, name

    def answer(self, rows: list[dict], task: TaskConfig, prompting: Prompting, **sampling) -> list[list[str]]:
        return prompting.answer(self.model, self.tokenizer, rows, task, **sampling)

    def choice_scores(self, rows: list[dict], task: TaskConfig, prompting: Prompting,
                      desc: str | None = None) -> torch.Tensor:
        """Its calibrated log-likelihood of each label of a choice task, per row: what ``answer`` chooses by."""
        return prompting.choice_scores(self.model, self.tokenizer, rows, task, desc=desc)

    def complete(self, chats: list[list[dict]], check, **sampling) -> list[list[str]]:
        """Answers to arbitrary chats (e.g. the judge's) in the form ``check`` asks for."""
        prompts = [data.render(self.tokenizer, chat) for chat in chats]
        return decoding.answer(self.model, self.tokenizer, prompts, check, **sampling)

    def evaluate(self, rows: list[dict], task: TaskConfig, cfg: EvalConfig, prompting: Prompting,
                 desc: str = "teacher baseline") -> Evaluation:
        return evaluate(self.model, self.tokenizer, rows, task, cfg, prompting=prompting, desc=desc)


class HttpTeacher:
    """A teacher behind an OpenAI-compatible chat completions endpoint.

    Requests run ``max_concurrency`` at a time; the OpenAI client retries failed ones with exponential
    backoff and applies the timeout. The server applies the model's chat template. With
    ``structured_outputs``, answers are constrained on the server (vLLM's guided decoding).
    """

    black_box = True

    def __init__(self, cfg: HttpTeacherConfig, client, key: str):
        self.cfg, self.client, self.key = cfg, client, key
        self.name = cfg.label

    @classmethod
    def connect(cls, cfg: HttpTeacherConfig, api_key: str | None, key: str = "prototype.teacher") -> "HttpTeacher":
        """A client for the endpoint, after checking that it answers and serves ``cfg.model``."""
        from openai import NotFoundError, OpenAI

        # Local servers (vLLM without --api-key, Ollama) accept any key; the client insists on one.
        client = OpenAI(base_url=cfg.base_url, api_key=api_key or "unused", max_retries=cfg.max_retries,
                        timeout=cfg.timeout_s)
        teacher = cls(cfg, client, key)
        with teacher.explained_errors():
            try:
                served = [model.id for model in client.models.list()]
            except NotFoundError:  # some servers have no model list; the first answer will tell
                return teacher
        if cfg.model not in served:
            raise DistilflowError(f"{key}.model: {cfg.base_url} does not serve {cfg.model!r}; it serves {served}")
        return teacher

    def answer(self, rows: list[dict], task: TaskConfig, prompting: Prompting, **sampling) -> list[list[str]]:
        return self.complete(prompting.chats(rows, task), task.check, max_new_tokens=task.max_answer_tokens,
                             **sampling)

    def complete(self, chats: list[list[dict]], check, *, temperature: float = 0.0, num_samples: int = 1,
                 seed: int = 0, max_new_tokens: int = 64, desc: str | None = None) -> list[list[str]]:
        """``num_samples`` answers per chat, one request each (``n`` is not supported everywhere);
        a greedy answer is asked once and repeated."""
        per_chat = num_samples if temperature > 0 else 1
        requests = [(chat, seed + sample) for chat in chats for sample in range(per_chat)]

        def ask(request) -> str:
            chat, sample_seed = request
            with self.explained_errors():
                response = self.client.chat.completions.create(
                    model=self.cfg.model, messages=chat, temperature=temperature, max_tokens=max_new_tokens,
                    seed=sample_seed, **self._constraint(check))
            return (response.choices[0].message.content or "").strip()

        pool = ThreadPoolExecutor(self.cfg.max_concurrency)
        try:
            texts = list(tqdm(pool.map(ask, requests), total=len(requests), desc=desc, disable=desc is None))
        finally:
            pool.shutdown(cancel_futures=True)  # after a failure, do not send the requests still queued
        return [texts[i:i + per_chat] * (num_samples // per_chat) for i in range(0, len(texts), per_chat)]

    def evaluate(self, rows: list[dict], task: TaskConfig, cfg: EvalConfig, prompting: Prompting,
                 desc: str = "teacher baseline") -> Evaluation:
        """Task score and serving speed; perplexity, size and parameters need weights: they stay None."""
        answers = [a[0] for a in self.answer(rows, task, prompting, desc=desc)]
        evaluation = score_answers(answers, rows, task, [data.user_message(row, task) for row in rows])
        evaluation.metrics["tokens_per_s"] = self.generation_speed(prompting.chats(rows[:1], task)[0],
                                                                   cfg.speed_new_tokens)
        return evaluation

    def generation_speed(self, chat: list[dict], new_tokens: int) -> float | None:
        """Tokens per second of one unconstrained greedy answer, as the endpoint serves it (network included)."""
        start = time.perf_counter()
        with self.explained_errors():
            response = self.client.chat.completions.create(model=self.cfg.model, messages=chat, temperature=0.0,
                                                           max_tokens=new_tokens)
        elapsed = time.perf_counter() - start
        tokens = response.usage.completion_tokens if response.usage else 0
        return tokens / elapsed if tokens else None

    def _constraint(self, check) -> dict:
        """Request fields that make the server answer in the check's form (vLLM's structured outputs)."""
        if not self.cfg.structured_outputs:
            return {}
        if check.type == "choice":
            return {"extra_body": {"structured_outputs": {"choice": list(check.choices)}}}
        if check.type == "regex":
            return {"extra_body": {"structured_outputs": {"regex": check.pattern}}}
        if check.type == "json_schema":
            return {"response_format": {"type": "json_schema",
                                        "json_schema": {"name": "answer", "schema": check.json_schema}}}
        return {}

    @contextmanager
    def explained_errors(self) -> Iterator[None]:
        """The client's errors (raised after its retries) as errors that say what to fix."""
        import openai

        try:
            yield
        except openai.APITimeoutError:
            raise DistilflowError(f"{self.key}.timeout_s: {self.cfg.base_url} did not answer within "
                                  f"{self.cfg.timeout_s:g} s ({self.cfg.max_retries} retries); raise timeout_s "
                                  "or lower max_concurrency") from None
        except openai.APIConnectionError as err:
            raise DistilflowError(f"{self.key}.base_url: cannot reach {self.cfg.base_url} "
                                  f"({type(err).__name__}: {err}) after {self.cfg.max_retries} retries; "
                                  "is the server running?") from None
        except openai.AuthenticationError:
            raise DistilflowError(f"{self.key}.api_key_env: {self.cfg.base_url} rejected the API key "
                                  f"(from ${self.cfg.api_key_env})" if self.cfg.api_key_env else
                                  f"{self.key}.api_key_env: {self.cfg.base_url} needs an API key; name the "
                                  "environment variable that holds it") from None
        except openai.APIStatusError as err:
            raise DistilflowError(f"{self.key}: {self.cfg.base_url} answered {err.status_code}: "
                                  f"{err.message}") from None
