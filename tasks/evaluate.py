"""The one evaluator every stage uses: task score, perplexity, size, bits per parameter, speed."""

import math
import time
from dataclasses import dataclass, field

import torch

from distilflow.configs.schema import EvalConfig, TaskConfig
from distilflow.tasks import data, decoding
from distilflow.tasks.models import parameter_count

JOURNEY_FIELDS = ("task_score", "perplexity", "size_bytes", "params", "bits_per_param", "tokens_per_s")


@dataclass
class Evaluation:
    metrics: dict[str, float]
    per_class: dict[str, float] = field(default_factory=dict)
    predictions: list[dict] = field(default_factory=list)

    def add_size(self, size_bytes: int) -> "Evaluation":
        """Record the model's size on disk (its weight files) and the bits each parameter costs."""
        self.metrics["size_bytes"] = size_bytes
        self.metrics["bits_per_param"] = 8 * size_bytes / self.metrics["params"]
        return self

    def journey_entry(self, state: str) -> dict:
        return {"state": state, **{k: self.metrics[k] for k in JOURNEY_FIELDS}}

    def report(self) -> dict:
        return {"metrics": self.metrics, "per_class_accuracy": self.per_class, "predictions": self.predictions}


@dataclass(frozen=True)
class Prompting:
    """How a model is asked: the few-shot examples it sees and whether its choices are calibrated.

    The teacher needs shots and calibration; a distilled student answers the bare prompt.
    """

    shots: tuple[dict, ...] = ()
    calibrate: bool = False

    def prompts(self, tokenizer, rows: list[dict], task: TaskConfig) -> list[str]:
        return [data.render(tokenizer, data.messages(row, task, self.shots)) for row in rows]

    def calibration_prompts(self, tokenizer, task: TaskConfig) -> list[str]:
        return self.prompts(tokenizer, data.content_free_rows(task), task) if self.calibrate else []

    def choose(self, model, tokenizer, rows: list[dict], task: TaskConfig, **sampling) -> list[list[str]]:
        """The model's answers to ``rows`` among the task's choices (see ``decoding.choose``)."""
        return decoding.choose(model, tokenizer, self.prompts(tokenizer, rows, task), task.check.choices,
                               calibration_prompts=self.calibration_prompts(tokenizer, task), **sampling)


def evaluate(model, tokenizer, rows: list[dict], task: TaskConfig, cfg: EvalConfig, *,
             prompting: Prompting = Prompting(), desc: str = "evaluating") -> Evaluation:
    """Measure ``model`` on the held-out ``rows``; sizes come from its saved files (``add_size``)."""
    prompts = prompting.prompts(tokenizer, rows, task)
    answers = [a[0] for a in prompting.choose(model, tokenizer, rows, task, desc=desc)]
    labels = [data.label(row, task) for row in rows]
    metrics = {
        "task_score": accuracy(answers, labels),
        "perplexity": perplexity(model, tokenizer, _reference_chats(rows[:cfg.perplexity_examples], task)),
        "params": parameter_count(model),
        **generation_speed(model, tokenizer, prompts[0], cfg.speed_new_tokens),
    }
    per_class = {choice: accuracy([a for a, l in zip(answers, labels) if l == choice], [choice] * labels.count(choice))
                 for choice in task.check.choices if choice in labels}
    predictions = [{"prompt": p, "answer": a, "label": l} for p, a, l in zip(prompts, answers, labels)]
    return Evaluation(metrics, per_class, predictions)


def accuracy(answers: list[str], labels: list[str]) -> float:
    return sum(a == l for a, l in zip(answers, labels)) / len(labels) if labels else 0.0


def _reference_chats(rows: list[dict], task: TaskConfig) -> list[list[dict]]:
    return [data.messages(row, task) + [{"role": "assistant", "content": data.label(row, task)}] for row in rows]


@torch.no_grad()
def perplexity(model, tokenizer, chats: list[list[dict]], batch_size: int = 8) -> float:
    """exp(mean next-token loss) over the held-out chats (prompt and reference answer)."""
    total_loss, total_tokens = 0.0, 0
    tokenizer.padding_side = "right"
    for start in range(0, len(chats), batch_size):
        texts = [tokenizer.apply_chat_template(c, tokenize=False) for c in chats[start:start + batch_size]]
        batch = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False).to(model.device)
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


def journey_table(journey: list[dict]) -> str:
    """The journey as a markdown table (it reads as plain text in a terminal too)."""
    bar = next((e["task_score"] for e in journey if e["state"] == "teacher"), None)
    lines = ["| state | task score | retention | perplexity | size (MB) | params (M) | bits/param | tokens/s |",
             "|---|---|---|---|---|---|---|---|"]
    for e in journey:
        retention = f"{e['task_score'] / bar:.2f}" if bar else "–"
        lines.append(f"| {e['state']} | {e['task_score']:.3f} | {retention} | {e['perplexity']:.1f} | "
                     f"{e['size_bytes'] / 1e6:.1f} | {e['params'] / 1e6:.1f} | {e['bits_per_param']:.2f} | "
                     f"{e['tokens_per_s']:.1f} |")
    return "\n".join(lines)
