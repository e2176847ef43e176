"""The one evaluator every stage uses: task score, perplexity, size, bits per parameter, speed."""

import math
import subprocess
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm

from distilflow.configs.schema import EvalConfig, TaskConfig
from distilflow.tasks import checks, data, decoding, fresh_process, journey, text_features
from distilflow.tasks.errors import DistilflowError
from distilflow.tasks.journey import JourneyEntry
from distilflow.tasks.models import load_model, parameter_count, resolve_device, size_on_disk

CONFIDENCE = 0.95
Z_95 = 1.959963984540054  # the standard normal's 97.5th percentile
BOOTSTRAP_RESAMPLES = 2000


@dataclass
class Evaluation:
    metrics: dict[str, float | list[float]]  # task_score_ci is [low, high]
    per_class: dict[str, float] = field(default_factory=dict)
    predictions: list[dict] = field(default_factory=list)
    smoke: list[dict] = field(default_factory=list)

    def add_size(self, size_bytes: int) -> "Evaluation":
        """Record the model's size on disk (its weight files) and the bits each parameter costs."""
        self.metrics["size_bytes"] = size_bytes
        self.metrics["bits_per_param"] = 8 * size_bytes / self.metrics["params"]
        return self

    def journey_entry(self, state: str, **details) -> JourneyEntry:
        """The state's row of the journey; a field this model cannot be measured by (a black-box
        teacher has no weights to size) is None."""
        return JourneyEntry(state, **{k: self.metrics.get(k) for k in journey.FIELDS}, **details)

    def report(self) -> dict:
        return {"metrics": self.metrics, "per_class_accuracy": self.per_class, "predictions": self.predictions,
                **({"smoke": self.smoke} if self.smoke else {})}


@dataclass(frozen=True)
class Prompting:
    """How a model is asked: the few-shot examples it sees and whether its choices are calibrated.

    The teacher needs shots and calibration; a distilled student answers the bare prompt. With ``nearest_of`` (kNN
    demonstrations, prototype.demonstrations: knn) each row sees its own ``len(shots)`` most similar examples of that
    pool instead of ``shots``, and is calibrated on content-free inputs shown the same examples.
    """

    shots: tuple[dict, ...] = ()
    calibrate: bool = False
    nearest_of: tuple[dict, ...] = ()

    def shots_for(self, rows: list[dict], task: TaskConfig) -> list[tuple[dict, ...]]:
        """The examples each row is shown."""
        if not self.nearest_of:
            return [self.shots] * len(rows)
        return text_features.nearest(list(self.nearest_of), rows, len(self.shots), task)

    def chats(self, rows: list[dict], task: TaskConfig) -> list[list[dict]]:
        return [data.messages(row, task, shots) for row, shots in zip(rows, self.shots_for(rows, task))]

    def calibration_chats(self, task: TaskConfig, shots: tuple[dict, ...] | None = None) -> list[list[dict]]:
        """Content-free inputs whose choice scores calibrate the real ones (choice tasks only), shown ``shots``
        (default: the fixed ones)."""
        if not (self.calibrate and task.check.type == "choice"):
            return []
        return [data.messages(row, task, self.shots if shots is None else shots) for row in data.content_free_rows(task)]

    def prompts(self, tokenizer, rows: list[dict], task: TaskConfig) -> list[str]:
        return [data.render(tokenizer, chat) for chat in self.chats(rows, task)]

    def choice_scores(self, model, tokenizer, rows: list[dict], task: TaskConfig,
                      desc: str | None = None) -> torch.Tensor:
        """The calibrated log-likelihood of each of a choice task's labels, per row (see ``decoding``)."""
        if self.nearest_of:
            return self._choice_scores_per_row(model, tokenizer, rows, task, desc)
        calibration = [data.render(tokenizer, chat) for chat in self.calibration_chats(task)]
        return decoding.calibrated_choice_scores(model, tokenizer, self.prompts(tokenizer, rows, task),
                                                 task.check.choices, calibration_prompts=calibration, desc=desc)

    def _choice_scores_per_row(self, model, tokenizer, rows: list[dict], task: TaskConfig,
                               desc: str | None) -> torch.Tensor:
        """Each row with its own examples: its prompt and its content-free prompts share those examples, so they run
        as one group whose common prefix (system prompt and examples) is computed once."""
        scores = torch.empty(len(rows), len(task.check.choices))
        for index, (row, shots) in enumerate(tqdm(list(zip(rows, self.shots_for(rows, task))), desc=desc,
                                                  disable=desc is None)):
            chats = [data.messages(row, task, shots), *self.calibration_chats(task, shots)]
            group = decoding.shared_prefix_choice_logprobs(model, tokenizer, [data.render(tokenizer, c) for c in chats],
                                                           task.check.choices)
            scores[index] = group[0] - group[1:].mean(0) if len(group) > 1 else group[0]
        return scores

    def answer(self, model, tokenizer, rows: list[dict], task: TaskConfig, **sampling) -> list[list[str]]:
        """The model's answers to ``rows`` in the task's form (see ``decoding.answer``)."""
        if self.nearest_of and task.check.type == "choice":
            desc = sampling.pop("desc", None)
            return decoding.pick(self.choice_scores(model, tokenizer, rows, task, desc), task.check.choices,
                                 **sampling)
        calibration = [data.render(tokenizer, chat) for chat in self.calibration_chats(task)]
        return decoding.answer(model, tokenizer, self.prompts(tokenizer, rows, task), task.check,
                               calibration_prompts=calibration, max_new_tokens=task.max_answer_tokens, **sampling)


def evaluate(model, tokenizer, rows: list[dict], task: TaskConfig, cfg: EvalConfig, *,
             prompting: Prompting = Prompting(), desc: str = "evaluating") -> Evaluation:
    """Measure ``model`` on the held-out ``rows``; sizes come from its saved files (``add_size``)."""
    prompts = prompting.prompts(tokenizer, rows, task)
    if task.check.type == "choice":
        evaluation = score_choices(prompting.choice_scores(model, tokenizer, rows, task, desc=desc), rows, task, prompts)
    else:
        evaluation = score_answers([a[0] for a in prompting.answer(model, tokenizer, rows, task, desc=desc)], rows,
                                   task, prompts)
    evaluation.metrics.update({
        "perplexity": perplexity(model, tokenizer, _reference_chats(rows[:cfg.perplexity_examples], task)),
        "params": parameter_count(model),
        **generation_speed(model, tokenizer, prompts[0], cfg.speed_new_tokens),
    })
    return evaluation


def score_choices(scores: torch.Tensor, rows: list[dict], task: TaskConfig, prompts: list[str]) -> Evaluation:
    """``score_answers`` for a choice task answered by its labels' (calibrated) log-likelihoods ``scores``: the most
    likely label is the answer, and each prediction keeps the probability of every label (an ensemble averages them)."""
    answers = [a[0] for a in decoding.pick(scores, task.check.choices)]
    probabilities = [dict(zip(task.check.choices, row)) for row in scores.softmax(1).tolist()]
    return score_answers(answers, rows, task, prompts, probabilities)


def score_answers(answers: list[str], rows: list[dict], task: TaskConfig, prompts: list[str],
                  probabilities: list[dict[str, float]] | None = None) -> Evaluation:
    """The task-score part of an evaluation: the metric over ``rows``, per class for a choice task, and
    every prediction (with its label ``probabilities`` where given). Black-box models (text only) are measured
    by this alone."""
    labels = [checks.label(row, task) for row in rows]
    per_class = {} if task.check.type != "choice" else {
        choice: task_score([a for a, label in zip(answers, labels) if label == choice],
                           [r for r, label in zip(rows, labels) if label == choice], task)
        for choice in task.check.choices if choice in labels}
    predictions = [{"prompt": p, "answer": a, "label": label, "score": checks.score(a, row, task),
                    **({"probabilities": probabilities[i]} if probabilities else {})}
                   for i, (p, a, label, row) in enumerate(zip(prompts, answers, labels, rows))]
    scores = [p["score"] for p in predictions]
    metrics = {"task_score": task_score(answers, rows, task), "task_score_ci": score_interval(scores)}
    if task.check.type == "json_schema" and task.check.metric != "exact_match":
        metrics["exact_match"] = whole_object_match(answers, labels, task)
    return Evaluation(metrics, per_class, predictions)


def whole_object_match(answers: list[str], labels: list[str], task: TaskConfig) -> float:
    """The share of valid answers equal to their label as a whole object (beside field F1's partial credit)."""
    return sum(checks.same_answer(a, label, task) for a, label in zip(answers, labels)) \
        / len(answers) if answers else 0.0


def score_interval(scores: list[float]) -> list[float]:
    """The 95% confidence interval [low, high] of the mean of per-example scores: Wilson's score interval
    when every score is 0 or 1 (accuracy), else a seeded percentile bootstrap of the mean."""
    if not scores:
        return [0.0, 1.0]
    if all(score in (0.0, 1.0) for score in scores):
        return wilson_interval(int(sum(scores)), len(scores))
    return bootstrap_interval(scores)


def wilson_interval(successes: int, n: int, z: float = Z_95) -> list[float]:
    """Wilson's score interval for a proportion: unlike the normal approximation, it stays inside [0, 1] and
    is not empty at 0 or n successes."""
    p = successes / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z / (1 + z * z / n) * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return [max(0.0, centre - half), min(1.0, centre + half)]


def bootstrap_interval(scores: list[float], resamples: int = BOOTSTRAP_RESAMPLES, seed: int = 0) -> list[float]:
    """The percentile bootstrap interval of the mean of ``scores`` (seeded: the same scores, the same interval)."""
    generator = torch.Generator().manual_seed(seed)
    values = torch.tensor(scores, dtype=torch.float64)
    means = values[torch.randint(len(values), (resamples, len(values)), generator=generator)].mean(1)
    tail = (1 - CONFIDENCE) / 2
    low, high = torch.quantile(means, torch.tensor([tail, 1 - tail], dtype=torch.float64)).tolist()
    return [low, high]


@dataclass(frozen=True)
class Evaluator:
    """The one evaluator, bound once per run: the task's held-out ``rows``, scored by the task's check with the
    ``settings`` (eval), on the run's ``device``. Every stage measures its models with it, so their numbers compare.
    """

    task: TaskConfig
    rows: list[dict]
    settings: EvalConfig
    device: torch.device

    def model(self, model, tokenizer, *, prompting: Prompting = Prompting(), desc: str = "evaluating") -> Evaluation:
        """A model in memory; its size comes from its saved files (``Evaluation.add_size``)."""
        return evaluate(model, tokenizer, self.rows, self.task, self.settings, prompting=prompting, desc=desc)

    def saved(self, model_dir: Path, *, smoke_prompts: int = 0, max_new_tokens: int = 16,
              desc: str = "evaluating") -> Evaluation:
        """Load ``model_dir`` the way a user would (plain ``from_pretrained``) and evaluate it.

        With ``smoke_prompts``, also answer that many held-out prompts by free greedy generation (what a
        server without guided decoding returns) and record how many pass the task's check, and latency.
        """
        model, tokenizer = load_model(model_dir, self.device)
        evaluation = self.model(model, tokenizer, desc=desc).add_size(size_on_disk(model_dir))
        if smoke_prompts:
            sample = self.rows[:smoke_prompts]
            start = time.perf_counter()
            answers = decoding.generate(model, tokenizer, Prompting().prompts(tokenizer, sample, self.task),
                                        max_new_tokens=max_new_tokens, batch_size=1)
            evaluation.metrics["smoke_latency_s"] = (time.perf_counter() - start) / len(sample)
            evaluation.metrics["smoke_pass_rate"] = sum(checks.is_valid(a, self.task) for a in answers) / len(sample)
            evaluation.smoke = [{"input": self.task.template.format(**row), "answer": a,
                                 "label": checks.label(row, self.task)} for row, a in zip(sample, answers)]
        return evaluation

    def in_fresh_process(self, model_dir: Path, *, smoke_prompts: int = 0, max_new_tokens: int = 16,
                         timeout_s: int = 1800) -> Evaluation:
        """``saved`` in a new Python process: proves the files on disk, not objects in memory."""
        request = {"evaluator": self.request(), "model_dir": str(model_dir), "smoke_prompts": smoke_prompts,
                   "max_new_tokens": max_new_tokens}
        try:
            answer = fresh_process.call("distilflow.tasks.evaluate", request, timeout_s=timeout_s)
        except subprocess.CalledProcessError as err:
            raise DistilflowError(f"{model_dir}: failed to load or answer in a fresh process:\n"
                                  f"{err.stderr[-3000:]}") from None
        return Evaluation(**answer)

    def request(self) -> dict:
        """The evaluator as JSON, for another process (``from_request``)."""
        return {"task": self.task.model_dump(mode="json"), "rows": self.rows,
                "eval": self.settings.model_dump(mode="json"), "device": str(self.device)}

    @classmethod
    def from_request(cls, request: dict) -> "Evaluator":
        return cls(TaskConfig.model_validate(request["task"]), request["rows"],
                   EvalConfig.model_validate(request["eval"]), resolve_device(request["device"].split(":")[0]))


def _evaluate_request(request: dict) -> dict:
    evaluator = Evaluator.from_request(request["evaluator"])
    evaluation = evaluator.saved(Path(request["model_dir"]), smoke_prompts=request["smoke_prompts"],
                                 max_new_tokens=request["max_new_tokens"])
    return asdict(evaluation)


def task_score(answers: list[str], rows: list[dict], task: TaskConfig) -> float:
    """Mean of the task's check over the rows (accuracy, for a `choice` task)."""
    return sum(checks.score(a, row, task) for a, row in zip(answers, rows)) / len(rows) if rows else 0.0


def _reference_chats(rows: list[dict], task: TaskConfig) -> list[list[dict]]:
    return [data.messages(row, task) + [{"role": "assistant", "content": checks.label(row, task)}] for row in rows]


@torch.no_grad()
def perplexity(model, tokenizer, chats: list[list[dict]], batch_size: int = 8) -> float:
    """exp(mean next-token loss) over the held-out chats (prompt and reference answer)."""
    total_loss, total_tokens = 0.0, 0
    texts = [tokenizer.apply_chat_template(chat, tokenize=False) for chat in chats]
    for batch in data.token_batches(tokenizer, texts, model.device, batch_size):
        logits = model(**batch).logits[:, :-1].float()
        targets = batch.input_ids[:, 1:]
        mask = batch.attention_mask[:, 1:].bool()
        losses = torch.nn.functional.cross_entropy(logits.transpose(1, 2), targets, reduction="none")
        total_loss += losses[mask].sum().item()
        total_tokens += mask.sum().item()
    return math.exp(total_loss / total_tokens)


@torch.no_grad()
def generation_speed(model, tokenizer, prompt: str, new_tokens: int) -> dict[str, float]:
    """Greedy decoding speed of one sequence: tokens/s, and time to first token."""
    inputs = tokenizer(prompt, return_tensors="pt", add_special_tokens=False).to(model.device)

    def timed(n: int) -> float:
        start = time.perf_counter()
        model.generate(**inputs, max_new_tokens=n, min_new_tokens=n, do_sample=False,
                       pad_token_id=tokenizer.pad_token_id)
        if model.device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - start

    timed(2)  # warm-up: first call pays one-off costs
    first = timed(1)
    total = timed(new_tokens)
    return {"tokens_per_s": new_tokens / total, "ttft_s": first}


if __name__ == "__main__":
    fresh_process.main(_evaluate_request)
