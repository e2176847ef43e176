"""The teacher, whatever it is: a model loaded here (white-box: weights and logits) or an
OpenAI-compatible HTTP endpoint such as vLLM, Ollama or a hosted API (black-box: no weights).

Both answer chats in the form the task's check asks for and measure their own task score on the
held-out split. A `choice` task is answered by each label's full log-likelihood, calibrated: from the
logits of a local teacher; from the prompt log-probs of a served one (vLLM's `prompt_logprobs` on
/v1/completions, token ids in, which needs the served model's tokenizer: `teacher.tokenizer`); a
server without them answers by its guided choice. Only a white-box teacher can be saved or pruned
into a student; logit KD reads either (a served teacher's top-k prompt log-probs: tasks/teacher_logits.py).
"""

import json
import logging
import os
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager

import torch
from tqdm.auto import tqdm

from distilflow.configs.schema import HttpTeacherConfig, LocalTeacherConfig, TaskConfig
from distilflow.tasks import data, decoding, package
from distilflow.tasks.environment import connection_problem
from distilflow.tasks.errors import DistilflowError, ServiceError
from distilflow.tasks.evaluate import Evaluation, Evaluator, Prompting, score_answers, score_choices
from distilflow.tasks.models import load_teacher

log = logging.getLogger("distilflow")

# How a teacher answers a choice task (the data card says which).
LOG_LIKELIHOOD, GUIDED_CHOICE, FREE_TEXT = "log-likelihood", "guided choice", "free text"

# Model-card fields a server fills anew on every call: not part of what identifies the served model.
VOLATILE_CARD_FIELDS = {"created", "object", "permission"}

# Text whose token ids the served model's tokenizer and ours must agree on: words, digits, punctuation,
# non-Latin scripts, an emoji, code and white space (besides the chat template's special tokens).
TOKENIZER_PROBE = "Hello, wörld! Order #1234 — 50% off? ½ café 日本語 🙂\n\tdef f(x): return x**2  "


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


def served_model(cfg: HttpTeacherConfig, environ, key: str = "prototype.teacher") -> dict:
    """What identifies the model behind ``cfg`` for cache keys: the server's model card for it (vLLM: its
    name, the weights' path or hub id `root`, `max_model_len`); raises if the server does not serve it."""
    return HttpTeacher(cfg, client_for(cfg, api_key(cfg, environ, key)), key).model_card()


def check_endpoint(cfg: HttpTeacherConfig, environ, key: str, top_k: int | None = None) -> "HttpTeacher":
    """Before any stage: the endpoint answers, accepts the key and serves ``cfg.model`` (with ``cfg.tokenizer``
    matching it); with ``top_k``, it returns that many prompt log-probs per position (logit KD needs them).
    Returns the teacher, connected."""
    teacher = HttpTeacher.connect(cfg, api_key(cfg, environ, key), key)
    if top_k is not None:
        teacher.require_prompt_logprobs(top_k)
    return teacher


def client_for(cfg: HttpTeacherConfig, api_key: str | None):
    """An OpenAI client for the endpoint, with the config's retries and timeout."""
    from openai import OpenAI

    # Local servers (vLLM without --api-key, Ollama) accept any key; the client insists on one.
    return OpenAI(base_url=cfg.base_url, api_key=api_key or "unused", max_retries=cfg.max_retries,
                  timeout=cfg.timeout_s)


class LocalTeacher:
    """A teacher whose weights are in memory: constrained choice by log-likelihood, logits for KD."""

    black_box = False
    choice_method = LOG_LIKELIHOOD

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

    def evaluate(self, evaluator: Evaluator, prompting: Prompting, desc: str = "teacher's score") -> Evaluation:
        return evaluator.model(self.model, self.tokenizer, prompting=prompting, desc=desc)


class HttpTeacher:
    """A teacher behind an OpenAI-compatible endpoint.

    Requests run ``max_concurrency`` at a time; the OpenAI client retries failed ones with exponential
    backoff and applies the timeout. Chats go to /v1/chat/completions (the server applies the model's
    chat template; with ``structured_outputs`` it constrains the answer: vLLM's guided decoding). Given the
    served model's tokenizer and a server that returns prompt log-probs, a choice is scored instead, from
    token ids sent to /v1/completions, exactly as a local teacher scores it.
    """

    black_box = True

    def __init__(self, cfg: HttpTeacherConfig, client, key: str, tokenizer=None):
        self.cfg, self.client, self.key, self.tokenizer = cfg, client, key, tokenizer
        self.name = cfg.label
        self.served = {"id": cfg.model}  # the server's model card, once asked for (``model_card``)

    @classmethod
    def connect(cls, cfg: HttpTeacherConfig, api_key: str | None, key: str = "prototype.teacher") -> "HttpTeacher":
        """A client for the endpoint, after checking that it answers and serves ``cfg.model``, and that
        ``cfg.tokenizer`` (if set) is the served model's; its labels are scored when the server allows."""
        teacher = cls(cfg, client_for(cfg, api_key), key)
        teacher.served = teacher.model_card()
        if cfg.tokenizer is None:
            return teacher
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(cfg.tokenizer)
        mismatch = teacher.tokenizer_mismatch(tokenizer)
        if mismatch:
            raise DistilflowError(f"{key}.tokenizer: {cfg.tokenizer} is not the tokenizer of {cfg.model} at "
                                  f"{cfg.base_url}: {mismatch}. Name the served model's tokenizer, or unset "
                                  f"{key}.tokenizer (labels are then chosen by the server's guided choice)")
        problem = teacher.prompt_logprobs_problem(0)
        if problem:
            log.warning("%s: %s; labels are chosen by its guided choice, not scored like a local teacher's",
                        cfg.base_url, problem)
        else:
            teacher.tokenizer = tokenizer
        return teacher

    @property
    def choice_method(self) -> str:
        if self.tokenizer is not None:
            return LOG_LIKELIHOOD
        return GUIDED_CHOICE if self.cfg.structured_outputs else FREE_TEXT

    def model_card(self) -> dict:
        """The server's card for ``cfg.model`` without the fields that change from call to call; the name
        alone where the server lists no models."""
        from openai import NotFoundError

        with self.explained_errors():
            try:
                cards = {card.id: card.to_dict() for card in self.client.models.list()}
            except NotFoundError:  # some servers have no model list; the first answer will tell
                return {"id": self.cfg.model}
        if self.cfg.model not in cards:
            served = f"it serves {sorted(cards)}" if cards else \
                "its /models lists no model: is base_url a server's OpenAI API (it ends in /v1)?"
            raise DistilflowError(f"{self.key}.model: {self.cfg.base_url} does not serve {self.cfg.model!r}; {served}")
        return {k: v for k, v in cards[self.cfg.model].items() if k not in VOLATILE_CARD_FIELDS}

    def answer(self, rows: list[dict], task: TaskConfig, prompting: Prompting, **sampling) -> list[list[str]]:
        return self.complete(prompting.chats(rows, task), task.check, max_new_tokens=task.max_answer_tokens,
                             calibration_chats=prompting.calibration_chats(task), **sampling)

    def complete(self, chats: list[list[dict]], check, *, calibration_chats: list[list[dict]] = (),
                 temperature: float = 0.0, num_samples: int = 1, seed: int = 0, max_new_tokens: int = 64,
                 desc: str | None = None) -> list[list[str]]:
        """``num_samples`` answers per chat in the form ``check`` asks for: a scored choice (calibrated by
        ``calibration_chats``) where the teacher scores labels, else generated, one request per answer
        (``n`` is not supported everywhere); a greedy answer is asked once and repeated."""
        if check.type == "choice" and self.choice_method == LOG_LIKELIHOOD:
            return decoding.pick(self.calibrated_choice_scores(chats, calibration_chats, check.choices, desc),
                                 check.choices, temperature=temperature, num_samples=num_samples, seed=seed)
        per_chat = num_samples if temperature > 0 else 1
        requests = [(chat, seed + sample) for chat in chats for sample in range(per_chat)]

        def ask(request) -> str:
            chat, sample_seed = request
            with self.explained_errors():
                response = self.client.chat.completions.create(
                    model=self.cfg.model, messages=chat, temperature=temperature, max_tokens=max_new_tokens,
                    seed=sample_seed, **self._constraint(check))
                return (response.choices[0].message.content or "").strip()

        texts = self.each(ask, requests, desc)
        return [texts[i:i + per_chat] * (num_samples // per_chat) for i in range(0, len(texts), per_chat)]

    def choice_scores(self, rows: list[dict], task: TaskConfig, prompting: Prompting,
                      desc: str | None = None) -> torch.Tensor:
        """Its calibrated log-likelihood of each label of a choice task, per row, from the server's prompt
        log-probs: what a local teacher's ``choice_scores`` gives (needs ``tokenizer``: ``choice_method`` is
        LOG_LIKELIHOOD)."""
        return self.calibrated_choice_scores(prompting.chats(rows, task), prompting.calibration_chats(task),
                                             task.check.choices, desc)

    def calibrated_choice_scores(self, chats: list[list[dict]], calibration_chats: list[list[dict]],
                                 choices: list[str], desc: str | None = None) -> torch.Tensor:
        """``decoding.calibrated_choice_scores`` through the server."""
        scores = self.choice_logprobs(chats, choices, desc=desc)
        return scores - self.choice_logprobs(calibration_chats, choices).mean(0) if calibration_chats else scores

    def choice_logprobs(self, chats: list[list[dict]], choices: list[str], desc: str | None = None) -> torch.Tensor:
        """``decoding.choice_logprobs`` through the server: the log-likelihood of each choice's tokens (to the
        end of the turn) after each chat, from its prompt log-probs; one request per chat."""
        choice_ids = decoding.choice_token_ids(self.tokenizer, choices)

        def score(chat: list[dict]) -> list[float]:
            prompt = self.tokenizer(data.render(self.tokenizer, chat), add_special_tokens=False).input_ids
            answers = self.prompt_logprobs([prompt + ids for ids in choice_ids], top_k=0)
            with self.explained_errors():
                return [sum(positions[len(prompt) + i][token][0] for i, token in enumerate(ids))
                        for positions, ids in zip(answers, choice_ids)]

        return torch.tensor(self.each(score, chats, desc))

    def prompt_logprobs(self, prompts: list[list[int]] | list[str], top_k: int) -> list[list[dict | None]]:
        """vLLM's prompt log-probs of each prompt (token ids, or text the server tokenizes): per position,
        token id -> (log-prob, rank) for the prompt's own token and the ``top_k`` most likely ones; None at
        the first position, which nothing predicts. One request, one generated token."""
        with self.explained_errors():
            response = self.client.completions.create(model=self.cfg.model, prompt=prompts, max_tokens=1,
                                                      temperature=0.0, extra_body={"prompt_logprobs": top_k})
            answers = [(choice.model_extra or {}).get("prompt_logprobs")
                       for choice in sorted(response.choices, key=lambda c: c.index)]
            if any(positions is None for positions in answers):
                raise DistilflowError(f"{self.key}: {self.cfg.base_url} stopped returning prompt log-probs "
                                      "(vLLM's `prompt_logprobs` on /v1/completions); is it still the same server?")
            return [[None if p is None else {int(t): (v["logprob"], v["rank"]) for t, v in p.items()}
                     for p in positions] for positions in answers]

    def prompt_logprobs_problem(self, top_k: int) -> str | None:
        """Why the server cannot give ``top_k`` prompt log-probs per position, or None if it can."""
        import openai

        with self.explained_errors():
            try:
                response = self.client.completions.create(model=self.cfg.model, prompt=TOKENIZER_PROBE,
                                                          max_tokens=1, extra_body={"prompt_logprobs": top_k})
            except openai.BadRequestError as err:
                return f"it refused {top_k} prompt log-probs per position ({err.message})"
            positions = (response.choices[0].model_extra or {}).get("prompt_logprobs")
            if positions is None:
                return "it returns no prompt log-probs (vLLM's `prompt_logprobs` on /v1/completions)"
            given = min(sum(entry["rank"] <= top_k for entry in p.values()) for p in positions if p is not None)
        return None if given >= top_k else f"it returns only {given} log-probs per position, not {top_k}"

    def require_prompt_logprobs(self, top_k: int) -> None:
        """Fail before training unless the server gives logit KD's top-k prompt log-probs."""
        problem = self.prompt_logprobs_problem(top_k)
        if problem:
            raise DistilflowError(
                f"distill.logit_kd.top_k is {top_k}, but {self.cfg.model} at {self.cfg.base_url} cannot give "
                f"them: {problem}. Logit KD from a served teacher reads vLLM's prompt log-probs, at most "
                f"--max-logprobs per position (20 unless the server was started with --max-logprobs {top_k}): "
                "restart it so, or lower distill.logit_kd.top_k; or drop logit_kd from distill.phases (sft "
                "works with any endpoint)")

    def tokenizer_mismatch(self, tokenizer) -> str | None:
        """How ``tokenizer`` splits text differently from the served model (its /tokenize), or None where it
        splits the probe text and a chat in its own template into the same token ids."""
        chat = [{"role": "user", "content": TOKENIZER_PROBE}, {"role": "assistant", "content": "ok"}]
        texts = [TOKENIZER_PROBE] + ([tokenizer.apply_chat_template(chat, tokenize=False)]
                                     if tokenizer.chat_template else [])
        for text in texts:
            ours, theirs = tokenizer(text, add_special_tokens=False).input_ids, self.tokenize(text)
            if ours != theirs:
                where = next((i for i, (a, b) in enumerate(zip(ours, theirs)) if a != b), min(len(ours), len(theirs)))
                return (f"{text!r} is {len(ours)} tokens here and {len(theirs)} there, first differing at token "
                        f"{where} ({ours[where:where + 4]} here, {theirs[where:where + 4]} there)")
        return None

    def tokenize(self, text: str) -> list[int]:
        """The served model's token ids of ``text`` (vLLM's /tokenize, beside /v1), no special tokens added."""
        import openai

        url = self.cfg.base_url.rstrip("/").removesuffix("/v1") + "/tokenize"
        with self.explained_errors():
            try:
                return self.client.post(url, cast_to=object, body={"model": self.cfg.model, "prompt": text,
                                                                    "add_special_tokens": False})["tokens"]
            except openai.NotFoundError:
                raise DistilflowError(f"{self.key}: {url} does not exist, so the token ids of this side cannot be "
                                      f"checked against the served model's (vLLM serves /tokenize)") from None

    def evaluate(self, evaluator: Evaluator, prompting: Prompting, desc: str = "teacher's score") -> Evaluation:
        """Task score and serving speed; perplexity, size and parameters need weights: they stay None."""
        rows, task = evaluator.rows, evaluator.task
        inputs = [data.user_message(row, task) for row in rows]
        if task.check.type == "choice" and self.choice_method == LOG_LIKELIHOOD:
            evaluation = score_choices(self.choice_scores(rows, task, prompting, desc=desc), rows, task, inputs)
        else:
            evaluation = score_answers([a[0] for a in self.answer(rows, task, prompting, desc=desc)], rows, task,
                                       inputs)
        evaluation.metrics["tokens_per_s"] = self.generation_speed(prompting.chats(rows[:1], task)[0],
                                                                   evaluator.settings.speed_new_tokens)
        return evaluation

    def generation_speed(self, chat: list[dict], new_tokens: int) -> float | None:
        """Tokens per second of one unconstrained greedy answer, as the endpoint serves it (network included)."""
        start = time.perf_counter()
        with self.explained_errors():
            response = self.client.chat.completions.create(model=self.cfg.model, messages=chat, temperature=0.0,
                                                           max_tokens=new_tokens)
            tokens = response.usage.completion_tokens if response.usage else 0
        elapsed = time.perf_counter() - start
        return tokens / elapsed if tokens else None

    def each(self, ask: Callable, items: list, desc: str | None = None) -> list:
        """``ask(item)`` for every item, ``max_concurrency`` requests at a time, in order."""
        pool = ThreadPoolExecutor(self.cfg.max_concurrency)
        try:
            return list(tqdm(pool.map(ask, items), total=len(items), desc=desc, disable=desc is None))
        finally:
            pool.shutdown(cancel_futures=True)  # after a failure, do not send the requests still queued

    def _constraint(self, check) -> dict:
        """Request fields that make the server answer in the check's form: vLLM's structured outputs, and for a
        choice llama.cpp's grammar beside them (each server ignores the other's field; llama.cpp reads
        `response_format` as vLLM does)."""
        if not self.cfg.structured_outputs:
            return {}
        if check.type == "json_schema":  # OpenAI's own field, which hosted APIs read too
            return {"response_format": {"type": "json_schema",
                                        "json_schema": {"name": "answer", "schema": check.json_schema}}}
        body = {**package.vllm_constraint(check), **package.llama_cpp_constraint(check)}
        return {"extra_body": body} if body else {}

    @contextmanager
    def explained_errors(self) -> Iterator[None]:
        """The client's errors (raised after its retries), and an answer that is not the shape of one, read inside
        the block, as errors that say what to fix. A failure that waiting may fix is a ServiceError raised from the
        client's error, so a stage retry can tell."""
        import openai

        try:
            yield
        except openai.APITimeoutError as err:
            raise ServiceError(f"{self.key}.timeout_s: {self.cfg.base_url} did not answer within "
                               f"{self.cfg.timeout_s:g} s ({self.cfg.max_retries} retries); raise timeout_s "
                               "or lower max_concurrency") from err
        except openai.APIConnectionError as err:
            raise ServiceError(f"{self.key}.base_url: cannot reach {self.cfg.base_url} after "
                               f"{self.cfg.max_retries} retries: {connection_problem(err)}") from err
        except openai.AuthenticationError:
            raise DistilflowError(f"{self.key}.api_key_env: {self.cfg.base_url} rejected the API key "
                                  f"(from ${self.cfg.api_key_env})" if self.cfg.api_key_env else
                                  f"{self.key}.api_key_env: {self.cfg.base_url} needs an API key; name the "
                                  "environment variable that holds it") from None
        except openai.APIStatusError as err:
            raise ServiceError(f"{self.key}: {self.cfg.base_url} answered {err.status_code}: "
                               f"{err.message}") from err
        except (ValueError, TypeError, AttributeError, KeyError, IndexError) as err:
            raise ServiceError(f"{self.key}.base_url: {self.cfg.base_url} answered with {_what_came(err)}, not an "
                               "OpenAI-compatible answer; is base_url a server's OpenAI API (vLLM, llama.cpp, "
                               "Ollama: it ends in /v1), with no proxy or login page in between?") from err


def _what_came(error: Exception) -> str:
    """What the server sent, as far as the error that reading it raised tells: a JSON parser's error holds the
    body; the client hands back as text a body that is not JSON, and reading fields of that text fails."""
    if isinstance(error, json.JSONDecodeError):
        return f"a body that is not JSON ({error.doc[:100]!r})"
    if isinstance(error, AttributeError) and isinstance(error.obj, str):
        return f"a body that is not JSON ({error.obj[:100]!r})"
    return f"JSON of another shape ({type(error).__name__}: {error})"
