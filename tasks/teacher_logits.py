"""The teacher's top-k log-probs over the distillation set, computed once and cached by content.

Logit KD against a live teacher holds both models in memory and runs the teacher at every step of
every epoch. Offline, the teacher runs once: for every answer token it keeps its k most likely next
tokens (int32 ids, fp16 log-probs) and the log of the probability left over (the tail), which is all
the divergence needs. The file lives in ``WORKDIR/artifacts/teacher_logits/<key>/``, where the key
hashes the teacher's weights, the exact token ids and k: any later run with the same teacher and
data reuses it.

The token ids are stored too, so the student trains on exactly the sequences the teacher scored.

A served teacher (an OpenAI-compatible vLLM endpoint) fills the same file from its top-k prompt
log-probs: the token ids go to the server, which returns, for every position, the k most likely
next tokens and their log-probs (at temperature 1); the tail is the probability they leave. Its key
hashes what the server reports about the served model instead of weight files.
"""

import hashlib
import json
import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from transformers import AutoConfig, AutoTokenizer

from distilflow.tasks import artifacts
from distilflow.tasks.artifacts import InArtifact, StageOutput
from distilflow.tasks.errors import DistilflowError
from distilflow.tasks.kd import TAIL_FLOOR

log = logging.getLogger("distilflow")

FILE = "teacher_logits.safetensors"


@dataclass(kw_only=True)
class TeacherLogits(StageOutput):
    """A published cache of the teacher's top-k log-probs (``FILE``)."""

    logits: InArtifact


@dataclass(frozen=True)
class Example:
    """A prompt + answer as token ids; ``completion_mask`` marks the answer's tokens."""

    input_ids: list[int]
    completion_mask: list[int]


def tokenize(tokenizer, rows, max_length: int) -> list[Example]:
    """Prompt and answer in the tokenizer's chat template; long examples lose the start of the prompt.

    The prompt (with the assistant's turn opened) and the answer are tokenized apart and joined, so
    the answer's first token is never merged into the prompt's last one.
    """
    examples, cut = [], 0
    for row in rows:
        prompt = tokenizer.apply_chat_template(row["prompt"], tokenize=False, add_generation_prompt=True)
        full = tokenizer.apply_chat_template(row["prompt"] + row["completion"], tokenize=False)
        if not full.startswith(prompt):
            raise DistilflowError(f"{tokenizer.name_or_path}: the chat template renders the answer's turn "
                                  "differently from the generation prompt; logit KD cannot align the answer "
                                  "tokens (use the sft phase)")
        prompt_ids = tokenizer(prompt, add_special_tokens=False).input_ids
        answer_ids = tokenizer(full[len(prompt):], add_special_tokens=False).input_ids
        # Keep the end: the answer is what KD trains on, and at least one prompt token must remain.
        keep = min(max_length, len(prompt_ids) + len(answer_ids))
        drop = len(prompt_ids) + len(answer_ids) - keep
        if drop >= len(prompt_ids):
            raise DistilflowError(f"distill.logit_kd.max_length ({max_length}) leaves no prompt token before an "
                                  f"answer of {len(answer_ids)} tokens; raise it")
        examples.append(Example(input_ids=(prompt_ids + answer_ids)[drop:],
                                completion_mask=([0] * len(prompt_ids) + [1] * len(answer_ids))[drop:]))
        cut += drop > 0
    if cut:
        log.warning("logit_kd: %d of %d examples are longer than distill.logit_kd.max_length (%d tokens): the start of "
                    "their prompts is left out (their answers are whole)", cut, len(examples), max_length)
    return examples


def teacher_ids(teacher_dir: Path, student_dir: str | Path) -> torch.Tensor | None:
    """The teacher's id of each of the student's tokens, or None where both use the same ids.

    Logit KD compares distributions token by token: the student's tokens must be the teacher's, all of
    them (the same vocabulary) or some (a trimmed one, ``distill.student.vocabulary: trim``), matched by
    their text.
    """
    teacher_vocab, student_vocab = (AutoTokenizer.from_pretrained(d).get_vocab() for d in (teacher_dir, student_dir))
    teacher_size = AutoConfig.from_pretrained(teacher_dir).get_text_config().vocab_size
    student_size = AutoConfig.from_pretrained(student_dir).get_text_config().vocab_size
    if teacher_vocab == student_vocab and teacher_size == student_size:
        return None
    if student_vocab.keys() <= teacher_vocab.keys() and sorted(student_vocab.values()) == list(range(student_size)):
        ids = torch.empty(student_size, dtype=torch.long)
        ids[list(student_vocab.values())] = torch.tensor([teacher_vocab[token] for token in student_vocab])
        return ids
    raise DistilflowError(
        f"distill.phases has logit_kd, but the teacher's tokenizer ({teacher_dir}: "
        f"{len(teacher_vocab)} tokens, vocab_size {teacher_size}) and the student's ({student_dir}: "
        f"{len(student_vocab)} tokens, vocab_size {student_size}) do not share a vocabulary (nor is the student's "
        "a part of the teacher's), so their token distributions cannot be compared. Use the sft phase "
        "(sequence-level KD on the teacher's answers) instead, or distil across vocabularies with "
        "distill.logit_kd.use_uld_loss: true (and teacher_logits: online).")


def in_teacher_ids(examples: list[Example], teacher_ids: torch.Tensor) -> list[Example]:
    """The student's tokenized examples in the teacher's ids, for the teacher to score."""
    return [Example(input_ids=teacher_ids[e.input_ids].tolist(), completion_mask=e.completion_mask) for e in examples]


def in_student_ids(tensors: dict[str, torch.Tensor], teacher_ids: torch.Tensor) -> dict[str, torch.Tensor]:
    """Cached teacher log-probs (``compute``'s, in the teacher's ids) in the student's ids: a top-k token the
    student lacks becomes id -1 at ``TAIL_FLOOR``, its probability moved into the tail (the tail holds every
    token the student cannot tell apart)."""
    size = max(int(teacher_ids.max()), int(tensors["topk_ids"].max()), int(tensors["input_ids"].max())) + 1
    student_id = torch.full((size,), -1, dtype=torch.long)
    student_id[teacher_ids] = torch.arange(len(teacher_ids))
    topk_ids = student_id[tensors["topk_ids"].long()]
    absent, logprobs = topk_ids < 0, tensors["topk_logprobs"].float()
    tail = torch.logaddexp(tensors["tail_logprob"], logprobs.masked_fill(~absent, float("-inf")).logsumexp(-1))
    return {**tensors, "input_ids": student_id[tensors["input_ids"].long()].to(torch.int32),
            "topk_ids": topk_ids.to(torch.int32), "tail_logprob": tail,
            "topk_logprobs": logprobs.masked_fill(absent, TAIL_FLOOR).to(torch.float16)}


def require_served_vocabulary(teacher, student_dir: str | Path) -> None:
    """Logit KD from a served teacher sends the student's token ids and gets the server's back: the student's
    tokenizer must split text into the ids the served model uses (``teacher``: tasks.teachers.HttpTeacher)."""
    mismatch = teacher.tokenizer_mismatch(AutoTokenizer.from_pretrained(student_dir))
    if mismatch:
        raise DistilflowError(
            f"distill.phases has logit_kd, but the student's tokenizer ({student_dir}) does not split text into "
            f"the token ids of the served teacher ({teacher.name}): {mismatch}, so their token distributions "
            "cannot be compared. Use a student from the teacher's family (same tokenizer), or the sft phase "
            "(sequence-level KD on the teacher's answers) instead.")


@torch.no_grad()
def compute(teacher, examples: list[Example], top_k: int, temperature: float,
            batch_size: int = 8) -> dict[str, torch.Tensor]:
    """For every answer token: the teacher's top-k next-token ids and log-probs, and the tail's log-prob.

    Position ``j`` predicts token ``j + 1``, so a sequence's targets are the positions before its
    answer tokens, in order.
    """
    device = teacher.device
    ids, logprobs, tails = [], [], []
    for start in range(0, len(examples), batch_size):
        batch = examples[start:start + batch_size]
        width = max(len(e.input_ids) for e in batch)
        input_ids = torch.zeros(len(batch), width, dtype=torch.long)
        attention = torch.zeros(len(batch), width, dtype=torch.long)
        targets = torch.zeros(len(batch), width, dtype=torch.bool)
        for row, example in enumerate(batch):
            input_ids[row, :len(example.input_ids)] = torch.tensor(example.input_ids)
            attention[row, :len(example.input_ids)] = 1
            targets[row, :len(example.input_ids) - 1] = torch.tensor(example.completion_mask[1:], dtype=torch.bool)
        logits = teacher(input_ids=input_ids.to(device), attention_mask=attention.to(device)).logits
        scaled = (logits[targets.to(device)].float() / temperature).log_softmax(-1)
        top = scaled.topk(min(top_k, scaled.size(-1)), dim=-1)
        ids.append(top.indices.to(torch.int32).cpu())
        logprobs.append(top.values.to(torch.float16).cpu())
        tails.append(scaled.scatter(-1, top.indices, float("-inf")).logsumexp(-1).cpu())
    return {"topk_ids": torch.cat(ids), "topk_logprobs": torch.cat(logprobs), "tail_logprob": torch.cat(tails),
            **_flat_examples(examples)}


def from_choices(tokenizer, rows, examples: list[Example], top_k: int, temperature: float) -> dict[str, torch.Tensor]:
    """The teacher's probability of every label (``row["choice_probs"]``, a choice task's soft labels) as
    next-token targets along each example's answer, in ``compute``'s format.

    Each label followed by the answer's end of turn is a token sequence; at every answer position, a token's
    probability is the mass of the labels that continue the answer so far with it, over the mass of those
    that continue it at all (a trie of the labels). The first position carries the whole distribution; past
    the point where only the kept label remains, the target is that label's next token. The ``top_k`` slots
    hold those tokens, then tokens the labels never use at ~zero probability (as the tail).
    """
    ids, logprobs, tails = [], [], []
    for row, example in zip(rows, examples):
        answer = [t for t, m in zip(example.input_ids, example.completion_mask) if m]
        end = tokenizer.decode(answer)[len(row["answer"]):]
        weights = {label: p ** (1 / temperature) for label, p in row["choice_probs"].items()}
        paths = {label: tokenizer(label + end, add_special_tokens=False).input_ids for label in weights}
        if paths.get(row["answer"]) != answer:
            raise DistilflowError(f"distill.logit_kd.teacher_logits: choices: the answer {row['answer']!r} is not "
                                  "one of the labels in choice_probs as the student's tokenizer writes them; use "
                                  "teacher_logits: offline")
        for position, token in enumerate(answer):
            branches = {}
            for label, path in paths.items():
                if path[:position] == answer[:position] and len(path) > position:
                    branches[path[position]] = branches.get(path[position], 0.0) + weights[label]
            if len(branches) > top_k:
                raise DistilflowError(f"distill.logit_kd.top_k ({top_k}) is below the {len(branches)} labels that "
                                      "start alike; raise it to at least the number of task.check.choices")
            mass = sum(branches.values())
            unused = (t for t in range(top_k + len(branches)) if t not in branches)
            slots = [*branches, *(next(unused) for _ in range(top_k - len(branches)))]
            ids.append(slots)
            logprobs.append([math.log(branches[t] / mass) if t in branches and branches[t] > 0 else TAIL_FLOOR
                             for t in slots])
            tails.append(TAIL_FLOOR)
    return {"topk_ids": torch.tensor(ids, dtype=torch.int32), "topk_logprobs": torch.tensor(logprobs,
                                                                                           dtype=torch.float16),
            "tail_logprob": torch.tensor(tails), **_flat_examples(examples)}


def _flat_examples(examples: list[Example]) -> dict[str, torch.Tensor]:
    lengths = torch.tensor([len(e.input_ids) for e in examples])
    return {"input_ids": torch.tensor([t for e in examples for t in e.input_ids], dtype=torch.int32),
            "completion_mask": torch.tensor([m for e in examples for m in e.completion_mask], dtype=torch.uint8),
            "sequence_offsets": torch.cat([torch.zeros(1, dtype=torch.long), lengths.cumsum(0)])}


def compute_from_endpoint(teacher, examples: list[Example], top_k: int) -> dict[str, torch.Tensor]:
    """``compute``'s tensors (at temperature 1) from a served ``teacher`` (tasks.teachers.HttpTeacher): its
    top-k prompt log-probs at every answer token, one request per example.

    The server's entry at position ``t`` is the distribution of token ``t`` given the tokens before it:
    the one ``compute`` reads from position ``t - 1``'s logits.
    """
    def answer_tokens(example: Example) -> list[list[tuple[int, float]]]:
        [positions] = teacher.prompt_logprobs([example.input_ids], top_k)
        return [sorted(positions[t].items(), key=lambda entry: entry[1][1])[:top_k]
                for t in range(1, len(example.input_ids)) if example.completion_mask[t]]

    tops = [top for example in teacher.each(answer_tokens, examples, desc="teacher log-probs (served)")
            for top in example]
    ids = torch.tensor([[token for token, _ in top] for top in tops], dtype=torch.int32)
    logprobs = torch.tensor([[logprob for _, (logprob, _) in top] for top in tops], dtype=torch.float64)
    tails = (1 - logprobs.exp().sum(-1)).clamp_min(0).log()  # the probability the top k leave
    return {"topk_ids": ids, "topk_logprobs": logprobs.to(torch.float16), "tail_logprob": tails.float(),
            **_flat_examples(examples)}


def cache_key(teacher_dir: Path, examples: list[Example], top_k: int, temperature: float) -> str:
    """Hash of what the log-probs depend on: the teacher's files, the exact token ids, k and temperature."""
    teacher_files = {str(p.relative_to(teacher_dir)): artifacts.file_sha256(p)
                     for p in sorted(teacher_dir.rglob("*")) if p.is_file()}
    return artifacts.stage_key("teacher_logits", teacher_files, _tokens_digest(examples), top_k, temperature)


def served_cache_key(served: dict, examples: list[Example], top_k: int) -> str:
    """Hash of what a served teacher's log-probs depend on: the server's card of the model (name, weights'
    path, context length: ``HttpTeacher.served``), the exact token ids and k."""
    return artifacts.stage_key("teacher_logits", {"served_model": served}, _tokens_digest(examples), top_k, 1.0)


def _tokens_digest(examples: list[Example]) -> str:
    return hashlib.sha256(json.dumps([[e.input_ids, e.completion_mask] for e in examples]).encode()).hexdigest()


def cached(teacher_dir: Path, examples: list[Example], top_k: int, temperature: float, workdir: Path,
           load_teacher) -> TeacherLogits:
    """The teacher's log-probs for ``examples``, from the cache or computed now (``load_teacher()`` is
    only called then) and published atomically."""
    return _cached(cache_key(teacher_dir, examples, top_k, temperature), str(teacher_dir),
                   lambda: compute(load_teacher(), examples, top_k, temperature), examples, top_k, temperature,
                   workdir)


def cached_from_endpoint(teacher, examples: list[Example], top_k: int, workdir: Path) -> TeacherLogits:
    """A served ``teacher``'s log-probs for ``examples``, from the cache or asked for now."""
    return _cached(served_cache_key(teacher.served, examples, top_k), teacher.name,
                   lambda: compute_from_endpoint(teacher, examples, top_k), examples, top_k, 1.0, workdir)


def _cached(key: str, teacher: str, computed, examples: list[Example], top_k: int, temperature: float,
            workdir: Path) -> TeacherLogits:
    def produce(out_dir: Path) -> TeacherLogits:
        start = time.perf_counter()
        tensors = computed()
        save_file(tensors, out_dir / FILE, metadata={"top_k": str(top_k), "temperature": str(temperature),
                                                     "teacher": teacher})
        kept_mass = tensors["topk_logprobs"].float().exp().sum(-1).mean().item()
        metrics = {"teacher_logits.positions": len(tensors["tail_logprob"]), "teacher_logits.top_k": top_k,
                   "teacher_logits.mass_in_top_k": kept_mass, "teacher_logits.bytes": (out_dir / FILE).stat().st_size,
                   "teacher_logits.seconds": time.perf_counter() - start}
        return TeacherLogits(logits=out_dir / FILE, metrics=metrics,
                             summary=f"top-{top_k} teacher log-probs for {len(examples)} examples; "
                                     f"mean mass in top-k {kept_mass:.3f}\n")

    result = artifacts.cached_or_run("teacher_logits", key, workdir, produce, TeacherLogits)
    log.info("teacher logits %s: %s", "reused" if result.cached else "computed", result.directory)
    return result


class CachedLogits(torch.utils.data.Dataset):
    """The cached sequences with their teacher log-probs, one training example per item."""

    def __init__(self, tensors: dict[str, torch.Tensor]):
        self.input_ids, self.completion_mask = tensors["input_ids"], tensors["completion_mask"]
        self.offsets = tensors["sequence_offsets"]
        self.topk_ids, self.topk_logprobs = tensors["topk_ids"], tensors["topk_logprobs"]
        self.tail_logprob = tensors["tail_logprob"]
        targets = torch.tensor([self.completion_mask[a + 1:b].sum().item()
                                for a, b in zip(self.offsets[:-1].tolist(), self.offsets[1:].tolist())])
        self.target_offsets = torch.cat([torch.zeros(1, dtype=torch.long), targets.cumsum(0)])

    @classmethod
    def load(cls, path: Path) -> "CachedLogits":
        return cls(load_file(path))

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        tokens = slice(self.offsets[i].item(), self.offsets[i + 1].item())
        targets = slice(self.target_offsets[i].item(), self.target_offsets[i + 1].item())
        return {"input_ids": self.input_ids[tokens].long(), "completion_mask": self.completion_mask[tokens].bool(),
                "topk_ids": self.topk_ids[targets].long(), "topk_logprobs": self.topk_logprobs[targets].float(),
                "tail_logprob": self.tail_logprob[targets]}
