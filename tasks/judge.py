"""LLM-as-judge: a model (the teacher by default) scores each kept answer 1..5 by the config's rubric;
answers scored below the threshold leave the distillation set.

The judge answers by constrained choice among "1".."5" (log-likelihood on a local model, structured
outputs on an endpoint that has them); a free reply is read for its first digit 1..5.
"""

import logging
import re
from collections import Counter

from distilflow.configs.schema import ChoiceCheck, JudgeConfig, TaskConfig
from distilflow.tasks import checks, data
from distilflow.tasks.errors import DistilflowError

log = logging.getLogger("distilflow")

SCORES = ChoiceCheck(choices=["1", "2", "3", "4", "5"])

# A judge that drops at least this share of the answers known to be right (they match their data labels)
# cannot tell right from wrong; it needs at least MIN_EVIDENCE such answers to be judged so.
UNDISCERNING = 0.9
MIN_EVIDENCE = 5

INSTRUCTIONS = ("You grade answers to a task. Read the task, the input, the answer and the rubric, then reply "
                "with a single digit from 1 (poor) to 5 (excellent).")


def judge_chat(row: dict, answer: str, task: TaskConfig, rubric: str) -> list[dict]:
    """What the judge reads for one answer."""
    question = (f"Task instructions:\n{task.system_prompt or '(none)'}\n\n"
                f"Input:\n{data.user_message(row, task)}\n\n"
                f"Answer:\n{answer}\n\n"
                f"Rubric:\n{rubric}\n\n"
                "Score (1-5):")
    return [{"role": "system", "content": INSTRUCTIONS}, {"role": "user", "content": question}]


def parse_score(reply: str) -> int | None:
    """The first standalone digit 1..5 in the judge's reply ("4", "Score: 4/5", "I give it a 4."), or None."""
    found = re.search(r"(?<!\d)[1-5](?!\d)", reply)
    return int(found.group()) if found else None


def judge_scores(judge, kept: list[dict], task: TaskConfig, cfg: JudgeConfig) -> list[int | None]:
    """The judge's score of every kept answer (None where its reply holds none)."""
    chats = [judge_chat(k["row"], k["answer"], task, cfg.rubric) for k in kept]
    replies = judge.complete(chats, SCORES, max_new_tokens=8, desc="judging answers")
    scores = [parse_score(reply[0]) for reply in replies]
    require_discerning_judge(kept, scores, task, cfg.threshold)
    return scores


def require_discerning_judge(kept: list[dict], scores: list[int | None], task: TaskConfig, threshold: float) -> None:
    """Fail when the judge rejects nearly every answer that matches its label (a judge as small as the teacher
    often scores everything "1"); warn when it rejects nearly everything and no label can tell who is wrong."""
    dropped = [score is None or score < threshold for score in scores]
    right = [d for k, d in zip(kept, dropped) if checks.label(k["row"], task) is not None and k["score"] == 1.0]
    if len(right) >= MIN_EVIDENCE and sum(right) >= UNDISCERNING * len(right):
        raise DistilflowError(
            f"prototype.judge: the judge rejected {sum(right)} of the {len(right)} kept answers that match their "
            f"labels (scored below threshold {threshold:g}, or unreadable): it cannot tell right answers from "
            f"wrong, and would leave {dropped.count(False)} of {len(kept)} answers. Use a stronger judge than the "
            "teacher (prototype.judge.teacher), lower prototype.judge.threshold, or remove prototype.judge")
    if len(kept) >= MIN_EVIDENCE and sum(dropped) >= UNDISCERNING * len(kept):
        log.warning("prototype.judge rejected %d of %d kept answers; check that it can judge this task",
                    sum(dropped), len(kept))


def judge_filter(kept: list[dict], scores: list[int | None], threshold: float) -> tuple[list[dict], Counter]:
    """The kept answers the judge scored at least ``threshold`` (with their score); the rest counted by reason."""
    passed, rejected = [], Counter()
    for item, score in zip(kept, scores):
        if score is None:
            rejected["judge_unparsed"] += 1
        elif score < threshold:
            rejected["judge_low_score"] += 1
        else:
            passed.append({**item, "judge_score": score})
    return passed, rejected
