"""The rules a config must keep, one row each: a bad config and the error `distilflow validate` names it by.

A rule lives once: on the pydantic model that owns it when the config alone decides it (configs/schema.py), or in
preflight when it depends on the device, a server or files (tasks/stages.py). `validate` runs exactly the checks a
run makes before its first stage, so each row fails here as the run would, before any stage.
"""

import pytest
import torch

from distilflow.configs.loader import load_config
from distilflow.flows.cli import main
from distilflow.tasks.errors import DistilflowError
from distilflow.tasks.stages import check_device
from tests.conftest import TINY_CONFIG, TINY_TEACHER

# An endpoint nothing listens on: the rules of an HTTP teacher are the config's, refused before it is asked.
HTTP_TEACHER = "{base_url: 'http://127.0.0.1:9/v1', model: big}"
STUDENT_OF_ITS_OWN = f"distill.student={{path: {TINY_TEACHER}}}"

RULES = {
    # the config alone (pydantic)
    "min_agreement-needs-samples": (["prototype.num_samples=1", "prototype.min_agreement=0.5"],
                                    "prototype.min_agreement compares several sampled answers per input"),
    "min_agreement-needs-sampling": (["prototype.temperature=0.0", "prototype.min_agreement=0.5"],
                                     "set prototype.num_samples >= 2 and prototype.temperature > 0"),
    "confidence-needs-a-choice-task": (
        ["task.check={type: regex, pattern: '.+'}", "prototype.min_confidence=0.5"],
        "prototype.min_confidence uses the teacher's probability of each label, which only a choice task has"),
    "most-confident-needs-a-choice-task": (
        ["task.check={type: regex, pattern: '.+'}", "prototype.keep_most_confident=0.5"],
        "prototype.keep_most_confident uses the teacher's probability of each label, which only a choice task has"),
    "soft-labels-need-a-choice-task": (
        ["task.check={type: regex, pattern: '.+'}", "distill.phases=[logit_kd]",
         "distill.logit_kd.teacher_logits=choices"],
        "distill.logit_kd.teacher_logits: choices uses the teacher's probability of each label, which only a choice "
        "task has"),
    "label-probabilities-need-a-served-tokenizer": (
        [f"prototype.teacher={HTTP_TEACHER}", STUDENT_OF_ITS_OWN, "prototype.keep_most_confident=0.5"],
        "prototype.keep_most_confident uses the teacher's probability of each label, but prototype.teacher is an "
        "HTTP endpoint without a tokenizer"),
    "soft-labels-need-a-served-tokenizer": (
        [f"prototype.teacher={HTTP_TEACHER}", STUDENT_OF_ITS_OWN, "distill.phases=[logit_kd]",
         "distill.logit_kd.teacher_logits=choices"],
        "distill.logit_kd.teacher_logits: choices uses the teacher's probability of each label, but "
        "prototype.teacher is an HTTP endpoint without a tokenizer"),
    "teacher-layers-need-the-teachers-weights": (
        [f"prototype.teacher={HTTP_TEACHER}"],
        "distill.student.teacher_layers keeps layers of the teacher's weights, but prototype.teacher is an HTTP "
        "endpoint"),
    "online-kd-needs-the-teachers-weights": (
        [f"prototype.teacher={HTTP_TEACHER}", STUDENT_OF_ITS_OWN, "distill.phases=[logit_kd]",
         "distill.logit_kd.teacher_logits=online"],
        "distill.logit_kd.teacher_logits: online runs the teacher's weights beside the student, but "
        "prototype.teacher is an HTTP endpoint"),
    "served-log-probs-are-at-temperature-1": (
        [f"prototype.teacher={HTTP_TEACHER}", STUDENT_OF_ITS_OWN, "distill.phases=[logit_kd]",
         "distill.logit_kd.temperature=2.0"],
        "distill.logit_kd.temperature is 2, but an HTTP teacher's server returns log-probs at temperature 1"),
    "each-phase-once": (["distill.phases=[sft, grpo, sft]"], "each phase may appear once"),
    "known-phases": (["distill.phases=[rlhf]"], "distill.phases.0"),
    "whole-grpo-groups": (["distill.grpo.num_generations=3"], "must be a multiple of num_generations"),
    "qlora-needs-lora": (["distill.qlora=true", "distill.lora=null"], "qlora trains LoRA adapters: set distill.lora"),
    "on-policy-needs-online-kd": (["distill.phases=[logit_kd]", "distill.logit_kd.on_policy_fraction=0.5"],
                                  "on_policy_fraction > 0 needs teacher_logits: online"),
    "ensemble-needs-another-member": (["prototype.ensemble={}"], "the ensemble has only the teacher"),
    "ensemble-weight-per-member": (["prototype.ensemble={baseline: true, weights: [1.0]}"],
                                   "weights: give 2 non-negative weights"),
    "ensemble-needs-a-choice-task": (["task.check={type: regex, pattern: '.+'}", "prototype.ensemble={baseline: true}"],
                                     "prototype.ensemble uses the teacher's probability of each label, which only a "
                                     "choice task has"),
    "ensemble-teacher-served-needs-a-tokenizer": (
        [f"prototype.ensemble={{teachers: [{HTTP_TEACHER}]}}"],
        "teachers[0] is an HTTP endpoint without a tokenizer"),
    "knn-needs-a-local-teacher": (
        [f"prototype.teacher={HTTP_TEACHER}", STUDENT_OF_ITS_OWN, "prototype.demonstrations=knn"],
        "prototype.demonstrations: knn gives each input its own examples, calibrated with them, which is built for "
        "local teachers only, but prototype.teacher is an HTTP endpoint"),
    "knn-needs-shots": (["prototype.demonstrations=knn", "prototype.few_shot=0"],
                        "prototype.demonstrations: knn picks each input's prototype.few_shot most similar examples, "
                        "but few_shot is 0"),
    "shot-sets-within-the-candidates": (["prototype.ensemble={shot_sets: 2}"],
                                        "prototype.ensemble.shot_sets is 2, but the teacher has only "
                                        "prototype.shot_candidates (1) few-shot sets"),
    "shot-sets-are-fixed-sets": (["prototype.demonstrations=knn", "prototype.shot_candidates=2",
                                  "prototype.ensemble={shot_sets: 2}"],
                                 "prototype.ensemble.shot_sets averages fixed few-shot sets, but "
                                 "prototype.demonstrations is knn"),
    "self-training-needs-a-choice-task": (
        ["task.check={type: regex, pattern: '.+'}", "prototype.ensemble={baseline: true, self_training_rounds: 1}"],
        "prototype.ensemble uses the teacher's probability of each label, which only a choice task has"),
    "margin-needs-a-baseline": (["prototype.baseline=none", "deploy.gate.min_margin_over_baseline=0.05"],
                                "deploy.gate.min_margin_over_baseline compares with the baseline, but "
                                "prototype.baseline is none"),
    "margin-needs-a-choice-task": (["task.check={type: regex, pattern: '.+'}",
                                    "deploy.gate.min_margin_over_baseline=0.05"],
                                   "the TF-IDF baseline, which only a choice task has"),
    # the data, the files, the device (preflight)
    "few-shot-pool-large-enough": (["task.few_shot_pool=1"],
                                   "task.few_shot_pool is 1; labelled examples outside the held-out split"),
    "knn-pool-larger-than-the-shots": (["prototype.demonstrations=knn", "task.few_shot_pool=2"],
                                       "+ 1 (prototype.demonstrations is knn: a pool example is never its own "
                                       "neighbour) needs 3"),
    "self-training-needs-unseen-pool-rows": (["prototype.few_shot=8", "prototype.ensemble={baseline: true, "
                                             "self_training_rounds: 1}"],
                                             "its 1 set(s) of prototype.few_shot (8) may show them all"),
    "as-many-teacher-layers-as-it-has": (["distill.student.teacher_layers=4"],
                                         "distill.student.teacher_layers is 4, but the teacher"),
    "more-teacher-layers-than-it-has": (["distill.student.teacher_layers=9"],
                                        "distill.student.teacher_layers is 9, but the teacher"),
    "qlora-needs-a-gpu": (["distill.qlora=true"], "distill.qlora needs a CUDA GPU (it trains on a 4-bit base"),
    "4-bit-teacher-needs-a-gpu": (["prototype.teacher.load_in_4bit=true"],
                                  "prototype.teacher.load_in_4bit needs a CUDA GPU (bitsandbytes' quantized kernels); "
                                  "this run's device is cpu"),
    "8-bit-teacher-needs-a-gpu": (["prototype.teacher.load_in_8bit=true"],
                                  "prototype.teacher.load_in_8bit needs a CUDA GPU"),
    "vllm-needs-a-gpu": (["eval.serving.engine=vllm"], "eval.serving.engine is vllm, which needs a GPU"),
}


@pytest.mark.parametrize("overrides, error", RULES.values(), ids=RULES.keys())
def test_a_config_that_breaks_a_rule_is_named_by_validate_before_any_stage(tmp_path, capsys, overrides, error):
    work = tmp_path / "work"
    arguments = [a for override in [f"run.workdir={work}", *overrides] for a in ("--set", override)]
    assert main(["validate", str(TINY_CONFIG), *arguments]) == 2
    assert error in capsys.readouterr().err
    assert not work.exists()


def test_more_distill_processes_than_visible_gpus_are_refused():
    cfg = load_config(TINY_CONFIG, {"distill.processes": 4})
    check_device(cfg, torch.device("cuda", 0), gpus=4)
    with pytest.raises(DistilflowError, match="distill.processes is 4 but only 2 GPUs are visible"):
        check_device(cfg, torch.device("cuda", 0), gpus=2)
