"""Token-level knowledge distillation: the student learns the teacher's next-token distribution.

Two trainers share one divergence (TRL's generalized JSD: beta 0 is forward KL, 1 reverse KL):
- online, ``OnlineKD``: TRL's GKDTrainer, with the teacher beside the student at every step and the
  full vocabulary compared; it also samples on-policy continuations that the teacher scores;
- offline, ``OfflineKD``: a transformers Trainer over the teacher's cached top-k log-probs
  (tasks/teacher_logits.py), so the teacher is never loaded. TRL's distillation trainers all run the
  teacher inside the step and take no precomputed log-probs, hence this one.
"""

import torch
import torch.nn.functional as F
from transformers import Trainer
from trl.experimental.gkd import GKDTrainer

from distilflow.configs.schema import LogitKDPhase

# exp(-50) is zero in fp32: an empty tail bucket (top-k covering the whole vocabulary) costs nothing.
TAIL_FLOOR = -50.0


def trl_beta(cfg: LogitKDPhase) -> float:
    """The configured divergence as TRL's generalized-JSD beta."""
    return {"forward_kl": 0.0, "reverse_kl": 1.0, "jsd": cfg.beta}[cfg.divergence]


def divergence(student_logprobs: torch.Tensor, teacher_logprobs: torch.Tensor, beta: float) -> torch.Tensor:
    """Per-position generalized JSD between two distributions given as log-probs over the last dim."""
    return GKDTrainer.generalized_jsd_loss(student_logprobs, teacher_logprobs, beta=beta, reduction="none").sum(-1)


def top_k_buckets(logits: torch.Tensor, top_k_ids: torch.Tensor, temperature: float) -> torch.Tensor:
    """The student's log-probs on the teacher's top-k tokens, plus one bucket for every other token.

    The divergence on these k + 1 buckets is exact for the coarsened distributions and equals the
    full-vocabulary one when k covers the vocabulary. An id of -1 is a teacher token the student lacks
    (a trimmed vocabulary): its bucket is empty on both sides (``teacher_logits.in_student_ids``).
    """
    logprobs = F.pad((logits.float() / temperature).log_softmax(-1), (0, 1), value=float("-inf"))
    ids = top_k_ids.where(top_k_ids >= 0, logprobs.size(-1) - 1)  # -1: the padded, always-empty column
    tail = logprobs.scatter(-1, ids, float("-inf")).logsumexp(-1, keepdim=True)
    return torch.cat([logprobs.gather(-1, ids).clamp_min(TAIL_FLOOR), tail.clamp_min(TAIL_FLOOR)], dim=-1)


def mixed(kd: torch.Tensor, ce: torch.Tensor | None, ce_weight: float) -> torch.Tensor:
    return kd if ce is None or ce_weight == 0 else (1 - ce_weight) * kd + ce_weight * ce


class OfflineKD(Trainer):
    """Logit KD against the teacher's cached top-k log-probs (batches from ``collate_cached``)."""

    def __init__(self, *args, kd: LogitKDPhase, **kwargs):
        super().__init__(*args, **kwargs)
        self.kd = kd

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        logits, outputs = answer_logits(model, inputs)
        teacher = torch.cat([inputs["topk_logprobs"], inputs["tail_logprob"][:, None].clamp_min(TAIL_FLOOR)], -1)
        kd = divergence(top_k_buckets(logits, inputs["topk_ids"], self.kd.temperature), teacher,
                        trl_beta(self.kd)).mean()
        answer_tokens = inputs["input_ids"][:, 1:][inputs["completion_mask"][:, 1:]]
        ce = F.cross_entropy(logits.float(), answer_tokens) if self.kd.ce_weight else None
        loss = mixed(kd, ce, self.kd.ce_weight)
        return (loss, outputs) if return_outputs else loss


def answer_logits(model, inputs: dict[str, torch.Tensor]):
    """The model's logits at the positions that predict answer tokens, row by row (the order of the cached
    teacher log-probs), and the model's outputs.

    Only those positions go through the LM head (``logits_to_keep``): with long prompts the full
    [batch, length, vocabulary] logits would be most of the step's memory and much of its compute.
    """
    answers = inputs["completion_mask"][:, 1:]  # position j predicts answer token j + 1
    predicting = answers.any(0).nonzero().squeeze(-1)
    outputs = model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"],
                    logits_to_keep=predicting)
    return outputs.logits[answers[:, predicting]], outputs


def collate_cached(pad_token_id: int):
    """Right-pads the sequences of ``CachedLogits`` items; their teacher log-probs are concatenated in
    order, matching the answer positions of the padded batch read row by row."""
    def collate(items: list[dict]) -> dict[str, torch.Tensor]:
        width = max(len(item["input_ids"]) for item in items)
        input_ids = torch.full((len(items), width), pad_token_id, dtype=torch.long)
        attention = torch.zeros(len(items), width, dtype=torch.long)
        completion = torch.zeros(len(items), width, dtype=torch.bool)
        for row, item in enumerate(items):
            n = len(item["input_ids"])
            input_ids[row, :n], attention[row, :n], completion[row, :n] = item["input_ids"], 1, item["completion_mask"]
        return {"input_ids": input_ids, "attention_mask": attention, "completion_mask": completion,
                **{key: torch.cat([item[key] for item in items]) for key in ("topk_ids", "topk_logprobs",
                                                                             "tail_logprob")}}
    return collate


class OnlineKD(GKDTrainer):
    """TRL's GKD, with its divergence taken at the configured temperature and mixed with cross-entropy.

    GKDTrainer (TRL 1.16) applies its temperature to sampling only and has no cross-entropy term; the
    loss below is its own, plus those two. Cross-entropy is on the dataset's answers, so it is left
    out on steps where the student wrote the continuation (on-policy).
    """

    def __init__(self, *args, kd: LogitKDPhase, **kwargs):
        super().__init__(*args, **kwargs)
        self.kd, self.student_wrote = kd, False

    def training_step(self, model, inputs, num_items_in_batch=None):
        self.student_wrote = False
        return super().training_step(model, inputs, num_items_in_batch)

    def generate_on_policy_outputs(self, model, inputs, generation_config):
        self.student_wrote = True
        return GKDTrainer.generate_on_policy_outputs(model, inputs, generation_config)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        outputs = model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"])
        self.teacher_model.eval()
        with torch.no_grad():
            teacher = self.teacher_model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"])
        logits, labels = outputs.logits[:, :-1], inputs["labels"][:, 1:]
        kd = self.generalized_jsd_loss(logits, teacher.logits[:, :-1], labels, beta=trl_beta(self.kd),
                                       temperature=self.kd.temperature, num_items_in_batch=num_items_in_batch)
        ce = None
        if self.kd.ce_weight and not self.student_wrote:
            ce = F.cross_entropy(logits.float().transpose(1, 2), labels, ignore_index=-100, reduction="sum")
            ce = ce / (num_items_in_batch if num_items_in_batch is not None else (labels != -100).sum().clamp_min(1))
        loss = mixed(kd, ce, self.kd.ce_weight)
        return (loss, outputs) if return_outputs else loss
