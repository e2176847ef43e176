"""Knowledge transfer: the KD losses, the teacher-logit cache, the phases, their tracking and resume."""

import functools
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from datasets import load_from_disk
from transformers import AutoModelForCausalLM, TrainingArguments
from trl import GRPOConfig, SFTConfig
from trl.experimental.gkd import GKDConfig, GKDTrainer

from distilflow.configs.loader import load_config, parse_overrides
from distilflow.tasks import distill, kd, teacher_logits
from distilflow.tasks.context import StageContext
from distilflow.tasks.data import load_task_data
from distilflow.tasks.evaluate import Evaluator
from distilflow.tasks.errors import DistilflowError
from distilflow.tasks.prototype import write_dataset
from distilflow.tasks.stages import run_stage
from distilflow.tasks.tracking import FileTracker, LogTracker, MlflowTracker
from tests.conftest import REPO, TINY_CONFIG, TINY_TEACHER, with_stages


def tiny_dataset(cfg, directory: Path, size: int = 12):
    """The prototype stage's dataset format, with labelled rows' labels as the teacher's answers, given
    probability 0.7 (0.1 for each other queue)."""
    rows = load_task_data(cfg.task, cfg.run.seed).eval[:size]
    kept = [{"row": row, "answer": row["label"], "score": 1.0, "input_index": i, "sample": 0, "confidence": 0.7,
             "agreement": None, "choice_probs": {c: 0.7 if c == row["label"] else 0.1 for c in cfg.task.check.choices}}
            for i, row in enumerate(rows)]
    write_dataset(kept, cfg.task, "reference labels", cfg.prototype, directory, directory / "x.jsonl")
    return load_from_disk(directory)


def context(cfg, tmp_path: Path, tracker=LogTracker()) -> StageContext:
    cpu = torch.device("cpu")
    evaluator = Evaluator(cfg.task, load_task_data(cfg.task, cfg.run.seed).eval, cfg.eval, cpu)
    return StageContext(workdir=tmp_path, out_dir=tmp_path / "out", checkpoint_dir=tmp_path / "checkpoints",
                        device=cpu, seed=0, evaluator=evaluator, tracker=tracker)


# --- the divergence ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("beta", [0.0, 0.5, 1.0])
def test_top_k_divergence_equals_trls_full_divergence_when_k_covers_the_vocabulary(beta):
    torch.manual_seed(0)
    student, teacher, temperature = torch.randn(6, 40), torch.randn(6, 40) * 3, 2.0
    full = GKDTrainer.generalized_jsd_loss(student, teacher, beta=beta, temperature=temperature,
                                           reduction="none").sum(-1)
    top = (teacher / temperature).log_softmax(-1).topk(40)
    teacher_buckets = torch.cat([top.values, torch.full((6, 1), kd.TAIL_FLOOR)], -1)
    ours = kd.divergence(kd.top_k_buckets(student, top.indices, temperature), teacher_buckets, beta)
    torch.testing.assert_close(ours, full, atol=1e-5, rtol=1e-4)


def test_top_k_divergence_never_exceeds_the_full_one():
    torch.manual_seed(0)
    student, teacher = torch.randn(6, 40), torch.randn(6, 40) * 3
    full = GKDTrainer.generalized_jsd_loss(student, teacher, beta=0.0, reduction="none").sum(-1)
    logprobs = teacher.log_softmax(-1)
    top = logprobs.topk(5)
    tail = logprobs.scatter(-1, top.indices, float("-inf")).logsumexp(-1, keepdim=True)
    coarse = kd.divergence(kd.top_k_buckets(student, top.indices, 1.0), torch.cat([top.values, tail], -1), 0.0)
    assert (coarse <= full + 1e-6).all() and (coarse > 0).all()


# --- tokenization and the teacher-logit cache -------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """The tiny config, a small distillation set and the tiny teacher's tokenizer."""
    work = tmp_path_factory.mktemp("tiny")
    cfg = load_config(TINY_CONFIG, {"run.workdir": str(work / "work")})
    from transformers import AutoTokenizer

    return cfg, tiny_dataset(cfg, work / "dataset"), AutoTokenizer.from_pretrained(TINY_TEACHER)


def test_tokenize_marks_the_answer_and_its_end_of_turn_only(tiny):
    cfg, dataset, tokenizer = tiny
    example = teacher_logits.tokenize(tokenizer, dataset, 256)[0]
    answer = [t for t, m in zip(example.input_ids, example.completion_mask) if m]
    assert tokenizer.decode(answer) == dataset[0]["answer"] + "<|im_end|>\n"
    assert example.completion_mask[0] == 0


def test_tokenize_drops_the_start_of_a_long_prompt_and_keeps_the_answer(tiny, caplog):
    _, dataset, tokenizer = tiny
    full = teacher_logits.tokenize(tokenizer, dataset, 256)[0]
    short = teacher_logits.tokenize(tokenizer, dataset, 12)[0]
    assert short.input_ids == full.input_ids[-12:] and short.completion_mask == full.completion_mask[-12:]
    assert f"{len(dataset)} of {len(dataset)} examples are longer than distill.logit_kd.max_length" in caplog.text


def test_tokenize_refuses_a_max_length_that_leaves_no_prompt(tiny):
    _, dataset, tokenizer = tiny
    with pytest.raises(DistilflowError, match="distill.logit_kd.max_length"):
        teacher_logits.tokenize(tokenizer, dataset, 2)


def test_sft_skips_and_counts_examples_whose_answer_max_length_would_cut(tiny, caplog):
    _, dataset, tokenizer = tiny
    lengths = [len(tokenizer.apply_chat_template(r["prompt"] + r["completion"], tokenize=True)["input_ids"])
               for r in dataset]
    kept = distill.whole_examples(tokenizer, dataset, sorted(lengths)[len(lengths) // 2])
    assert 0 < len(kept) < len(dataset)
    assert f"{len(dataset) - len(kept)} of {len(dataset)} training examples are longer than distill.sft.max_length" \
        in caplog.text
    with pytest.raises(DistilflowError, match="distill.sft.max_length is 4 tokens, shorter than every training example"):
        distill.whole_examples(tokenizer, dataset, 4)


def test_cached_top_k_log_probs_are_the_teachers_at_each_answer_position(tiny, tiny_teacher):
    _, dataset, tokenizer = tiny
    model, _ = tiny_teacher
    examples = teacher_logits.tokenize(tokenizer, dataset, 256)[:3]
    item = teacher_logits.CachedLogits(teacher_logits.compute(model, examples, 4, 1.0))[1]
    ids = torch.tensor([examples[1].input_ids])
    with torch.no_grad():
        logprobs = model(input_ids=ids).logits[0, :-1].log_softmax(-1)
    positions = torch.tensor(examples[1].completion_mask[1:], dtype=torch.bool)
    expected = logprobs[positions].topk(4)
    assert torch.equal(item["topk_ids"], expected.indices)
    torch.testing.assert_close(item["topk_logprobs"], expected.values, atol=2e-3, rtol=1e-3)
    kept = item["topk_logprobs"].exp().sum(-1) + item["tail_logprob"].exp()
    torch.testing.assert_close(kept, torch.ones_like(kept), atol=2e-3, rtol=0)


def test_the_students_answer_logits_are_the_full_logits_at_the_cached_positions(tiny, tiny_teacher):
    _, dataset, tokenizer = tiny
    model, _ = tiny_teacher
    examples = teacher_logits.tokenize(tokenizer, dataset, 256)[:4]  # rows of different lengths
    cached = teacher_logits.CachedLogits(teacher_logits.compute(model, examples, 4, 1.0))
    batch = kd.collate_cached(tokenizer.pad_token_id)([cached[i] for i in range(len(cached))])
    with torch.no_grad():
        logits, _ = kd.answer_logits(model, batch)
        full = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    expected = full[:, :-1][batch["completion_mask"][:, 1:]]
    assert logits.shape == expected.shape == (len(batch["topk_ids"]), full.shape[-1])
    torch.testing.assert_close(logits, expected)


def test_teacher_logits_are_computed_once_then_reused_without_the_teacher(tiny, tiny_teacher, tmp_path):
    _, dataset, tokenizer = tiny
    examples = teacher_logits.tokenize(tokenizer, dataset, 256)
    loads = []

    def load_teacher():
        loads.append(1)
        return tiny_teacher[0]

    first = teacher_logits.cached(TINY_TEACHER, examples, 8, 1.0, tmp_path, load_teacher)

    def no_teacher():
        raise AssertionError("the cached log-probs should have been reused")

    again = teacher_logits.cached(TINY_TEACHER, examples, 8, 1.0, tmp_path, no_teacher)
    assert loads == [1] and not first.cached and again.cached
    assert again.directory == first.directory and first.directory.parent == tmp_path / "artifacts" / "teacher_logits"
    assert first.metrics["teacher_logits.positions"] == sum(sum(e.completion_mask) for e in examples)


def test_teacher_logits_cache_key_changes_with_k_and_data(tiny):
    _, dataset, tokenizer = tiny
    examples = teacher_logits.tokenize(tokenizer, dataset, 256)
    key = teacher_logits.cache_key(TINY_TEACHER, examples, 8, 1.0)
    assert key == teacher_logits.cache_key(TINY_TEACHER, examples, 8, 1.0)
    assert key != teacher_logits.cache_key(TINY_TEACHER, examples, 16, 1.0)
    assert key != teacher_logits.cache_key(TINY_TEACHER, examples[1:], 8, 1.0)


def answer_targets(tokenizer, row: dict, choice_probs: dict, temperature: float = 1.0, top_k: int = 4):
    """The soft-label targets of one row answered "bug", per answer position, as {token: probability}."""
    row = {**row, "answer": "bug", "completion": [{"role": "assistant", "content": "bug"}],
           "choice_probs": choice_probs}
    targets = teacher_logits.from_choices(tokenizer, [row], teacher_logits.tokenize(tokenizer, [row], 256), top_k,
                                          temperature)
    probabilities = targets["topk_logprobs"].float().exp()
    return [{token: p for token, p in zip(ids.tolist(), probs.tolist()) if p > 1e-6}
            for ids, probs in zip(targets["topk_ids"], probabilities)]


def tokens(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False).input_ids


def test_soft_labels_put_the_teachers_label_probabilities_on_the_answers_tokens(tiny):
    _, dataset, tokenizer = tiny
    probs = {"payment": 0.1, "delivery": 0.2, "bug": 0.6, "account": 0.1}
    targets = answer_targets(tokenizer, dataset[0], probs)
    assert targets[0] == pytest.approx({tokens(tokenizer, label)[0]: p for label, p in probs.items()}, abs=1e-3)
    answer = tokens(tokenizer, "bug<|im_end|>\n")
    assert len(targets) == len(answer)
    assert all(target == pytest.approx({token: 1.0}) for target, token in zip(targets[1:], answer[1:]))


def test_soft_labels_follow_labels_that_share_their_first_tokens(tiny):
    _, dataset, tokenizer = tiny
    bug, bugfix = tokens(tokenizer, "bug<|im_end|>\n"), tokens(tokenizer, "bugfix<|im_end|>\n")
    fork = next(i for i, (a, b) in enumerate(zip(bug, bugfix)) if a != b)
    targets = answer_targets(tokenizer, dataset[0], {"bug": 0.3, "bugfix": 0.6, "payment": 0.1})
    assert targets[0] == pytest.approx({bug[0]: 0.9, tokens(tokenizer, "payment")[0]: 0.1}, abs=1e-3)
    assert targets[fork] == pytest.approx({bug[fork]: 1 / 3, bugfix[fork]: 2 / 3}, abs=1e-3)
    assert all(len(target) == 1 for target in targets[1:fork] + targets[fork + 1:])


def test_soft_labels_are_sharpened_or_softened_by_the_temperature(tiny):
    _, dataset, tokenizer = tiny
    soft = answer_targets(tokenizer, dataset[0], {"bug": 0.8, "payment": 0.2}, temperature=2.0)[0]
    assert soft == pytest.approx({tokens(tokenizer, "bug")[0]: 2 / 3, tokens(tokenizer, "payment")[0]: 1 / 3},
                                 abs=1e-3)  # 0.8^(1/2) : 0.2^(1/2)


def test_logit_kd_on_soft_labels_trains_without_the_teacher_or_its_vocabulary(tiny, tmp_path):
    cfg, dataset, _ = tiny
    cfg = load_config(TINY_CONFIG, {"distill.logit_kd.teacher_logits": "choices", "distill.logit_kd.max_steps": 2,
                                    "distill.logit_kd.top_k": 4, "distill.phases": ["logit_kd"]})
    ctx = context(cfg, tmp_path)
    ctx.checkpoint_dir.mkdir()
    sources = distill.teacher_sources("logit_kd", TINY_TEACHER, dataset, None, cfg.distill, ctx)
    from distilflow.tasks.models import load_model

    student, tokenizer = load_model(TINY_TEACHER, torch.device("cpu"))
    before = {k: v.clone() for k, v in student.state_dict().items()}
    trained = distill.logit_kd(student, tokenizer, dataset, cfg.distill, ctx,
                               logits_file=Path(sources["logits_file"]))
    assert any(not torch.equal(before[k], v) for k, v in trained.state_dict().items())


def test_soft_labels_need_the_label_probabilities_in_the_dataset(tiny, tmp_path):
    cfg, dataset, _ = tiny
    cfg = load_config(TINY_CONFIG, {"distill.logit_kd.teacher_logits": "choices"})
    with pytest.raises(DistilflowError, match="no choice_probs"):
        distill.teacher_sources("logit_kd", TINY_TEACHER, dataset.remove_columns("choice_probs"), None, cfg.distill,
                                context(cfg, tmp_path))


def test_a_student_with_another_vocabulary_is_refused_naming_both_tokenizers(tmp_path):
    from transformers import AutoConfig, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(TINY_TEACHER)
    other = tmp_path / "other-student"
    tokenizer.add_tokens(["<extra_token>"])
    tokenizer.save_pretrained(other)
    AutoConfig.from_pretrained(TINY_TEACHER).save_pretrained(other)
    with pytest.raises(DistilflowError) as caught:
        teacher_logits.teacher_ids(TINY_TEACHER, other)
    message = str(caught.value)
    assert str(TINY_TEACHER) in message and str(other) in message and "sft" in message


# --- training settings in TRL's and PEFT's own words -----------------------------------------------------

TRAINER_SETTINGS = {"lr_scheduler_type": "cosine", "warmup_steps": 0.1, "weight_decay": 0.01, "max_grad_norm": 0.5}


def test_the_sft_settings_on_the_command_line_reach_trls_sft_config(tmp_path):
    overrides = parse_overrides(["distill.sft.warmup_ratio=0.1", "distill.sft.lr_scheduler_type=cosine"])
    cfg = load_config(TINY_CONFIG, overrides)
    args = distill.training_args(SFTConfig, cfg.distill.sft, context(cfg, tmp_path))
    assert isinstance(args, SFTConfig)
    assert (args.warmup_steps, args.lr_scheduler_type) == (0.1, "cosine")
    assert (args.max_steps, args.per_device_train_batch_size, args.max_length) == (4, 4, 128)  # tiny.yaml's


@pytest.mark.parametrize("section, overrides, args_class", [
    ("distill.sft", {}, SFTConfig),
    ("distill.logit_kd", {}, TrainingArguments),
    ("distill.logit_kd", {"distill.logit_kd.teacher_logits": "online"}, GKDConfig),
    ("distill.grpo", {}, GRPOConfig),
    ("compress.prune.heal.logit_kd", {"compress.prune.depth.keep_layers": 1}, GKDConfig),
])
def test_every_phases_trainer_arguments_reach_its_trainers_config_unchanged(section, overrides, args_class, tmp_path):
    cfg = load_config(TINY_CONFIG, {**overrides, **{f"{section}.{k}": v for k, v in TRAINER_SETTINGS.items()}})
    settings = functools.reduce(getattr, section.split("."), cfg)
    args = distill.training_args(args_class, settings, context(cfg, tmp_path))
    assert {key: getattr(args, key) for key in TRAINER_SETTINGS} == TRAINER_SETTINGS


def test_peft_lora_settings_reach_the_adapters_unchanged():
    cfg = load_config(TINY_CONFIG, {"distill.lora.use_rslora": True, "distill.lora.lora_dropout": 0.1,
                                    "distill.lora.bias": "lora_only"})
    adapted = distill.with_adapters(AutoModelForCausalLM.from_pretrained(TINY_TEACHER), cfg.distill.lora)
    lora = adapted.peft_config["default"]
    assert (lora.r, lora.lora_alpha, lora.lora_dropout, lora.use_rslora, lora.bias) == (4, 8, 0.1, True, "lora_only")


# --- GRPO's reward ----------------------------------------------------------------------------------------

def test_task_check_reward_scores_sampled_answers_like_the_evaluator(tiny_cfg):
    reward = distill.task_check_reward(tiny_cfg.task)
    completions = [[{"role": "assistant", "content": " bug\n"}], [{"role": "assistant", "content": "bug"}],
                   [{"role": "assistant", "content": "a bug"}], [{"role": "assistant", "content": "payment"}]]
    assert reward(completions, label=["bug", "payment", "bug", "payment"], answer=["bug"] * 4) == [1.0, 0.0, 0.0, 1.0]


def test_task_check_reward_needs_no_gold_label_it_scores_against_the_teachers_answer(tiny_cfg):
    reward = distill.task_check_reward(tiny_cfg.task)
    completions = [[{"role": "assistant", "content": "bug"}], [{"role": "assistant", "content": "payment"}]]
    assert reward(completions, label=["", ""], answer=["bug", "bug"]) == [1.0, 0.0]


def test_teacher_agreement_rewards_the_teachers_own_answer(tiny_cfg):
    completions = [[{"role": "assistant", "content": "bug"}], [{"role": "assistant", "content": "account"}]]
    assert distill.teacher_agreement_reward(tiny_cfg.task)(completions, answer=["bug", "payment"]) == [1.0, 0.0]


def test_on_a_json_task_the_reward_is_field_f1_against_the_teachers_answer_and_0_for_an_invalid_one():
    task = load_config(REPO / "configs" / "extract.yaml").task
    teacher = '{"queue": "payment", "order_id": "#A1042", "amount": 49, "currency": "USD", "product": null}'
    sampled = ['{"queue": "payment", "order_id": "#A1042", "amount": 49, "currency": "USD", "product": null}',
               '{"queue": "payment", "order_id": null, "amount": 49, "currency": "EUR", "product": null}',
               '{"queue": "payment", "order_id": "#A1042", "amount": "49", "currency": "USD", "product": null}',
               '{"queue": "payment", "order_id": "#A1042"']
    completions = [[{"role": "assistant", "content": text}] for text in sampled]
    rewards = distill.task_check_reward(task)(completions, label=[""] * 4, answer=[teacher] * 4)
    # 2 of 3 predicted fields right, 2 of 4 of the teacher's found: F1 = 4/7; "49" and a cut-off object fail the schema.
    assert rewards == pytest.approx([1.0, 4 / 7, 0.0, 0.0])


def test_teacher_agreement_on_a_json_task_compares_objects_not_their_spelling():
    task = load_config(REPO / "configs" / "extract.yaml").task
    teacher = '{"queue": "bug", "order_id": null, "amount": null, "currency": null, "product": "tablet"}'
    spelled = '{"product":"tablet","queue":"bug","order_id":null,"amount":null,"currency":null}'
    completions = [[{"role": "assistant", "content": spelled}]]
    assert distill.teacher_agreement_reward(task)(completions, answer=[teacher]) == [1.0]


def test_sampling_stops_at_the_chat_templates_end_of_turn(tiny_teacher):
    model, tokenizer = tiny_teacher
    model.generation_config.eos_token_id = tokenizer.convert_tokens_to_ids("<|endoftext|>")
    distill.stop_at_turn_end(model, tokenizer)
    assert tokenizer.convert_tokens_to_ids("<|im_end|>") in model.generation_config.eos_token_id


# --- the phases -------------------------------------------------------------------------------------------

def test_online_logit_kd_with_on_policy_steps_changes_the_student(tiny, tmp_path):
    cfg, dataset, _ = tiny
    cfg = load_config(TINY_CONFIG, {"distill.logit_kd.teacher_logits": "online", "distill.logit_kd.max_steps": 2,
                                    "distill.logit_kd.on_policy_fraction": 1.0, "distill.logit_kd.ce_weight": 0.5,
                                    "distill.logit_kd.max_new_tokens": 4})
    from distilflow.tasks.models import load_model

    student, tokenizer = load_model(TINY_TEACHER, torch.device("cpu"))
    before = {k: v.clone() for k, v in student.state_dict().items()}
    teacher, _ = load_model(TINY_TEACHER, torch.device("cpu"))
    trained = distill.logit_kd(student, tokenizer, dataset, cfg.distill, context(cfg, tmp_path), teacher=teacher)
    assert any(not torch.equal(before[k], v) for k, v in trained.state_dict().items())


def test_grpo_weighs_the_teacher_agreement_bonus_beside_the_tasks_check(tiny, tmp_path):
    cfg, dataset, _ = tiny
    cfg = load_config(TINY_CONFIG, {"distill.grpo.max_steps": 1, "distill.grpo.teacher_agreement_bonus": 0.5})
    from distilflow.tasks.models import load_model

    student, tokenizer = load_model(TINY_TEACHER, torch.device("cpu"))
    ctx = context(cfg, tmp_path)
    distill.grpo(student, tokenizer, dataset, cfg.distill, ctx)
    args = json.loads((ctx.checkpoint_dir / "effective_training_args.json").read_text())
    assert args["reward_weights"] == [1.0, 0.5] and args["max_steps"] == 1


@pytest.fixture(scope="module")
def three_phases(tmp_path_factory, tiny_prototype):
    """The distill stage with sft -> logit_kd (offline) -> grpo on the tiny config (its prototype: the session's),
    tracked in MLflow."""
    work = tmp_path_factory.mktemp("phases")
    cfg = load_config(TINY_CONFIG, {"run.workdir": str(work), "distill.phases": ["sft", "logit_kd", "grpo"],
                                    **{f"distill.{phase}.{key}": value for phase in ("sft", "logit_kd", "grpo")
                                       for key, value in TRAINER_SETTINGS.items()}})
    tracker = MlflowTracker.start(f"sqlite:///{work / 'mlflow.db'}", "tiny", work / "mlartifacts", "test", {})
    result = run_stage("distill", cfg, tiny_prototype, tracker=tracker)
    return cfg, tracker, result


def phase_runs(tracker) -> dict:
    client = tracker.client
    parent = client.get_run(tracker.run_id)
    runs = client.search_runs([parent.info.experiment_id], filter_string="tags.`distilflow.phase` != ''")
    return {run.data.tags["distilflow.phase"]: run for run in runs}


def test_journey_has_the_student_after_each_phase_in_order(three_phases):
    _, _, result = three_phases
    assert [(e.state, e.phase) for e in result.journey] == [("student", "sft"), ("student", "logit_kd"),
                                                                   ("student", "grpo")]
    assert all(0 <= e.task_score <= 1 and e.params > 0 for e in result.journey)


def test_each_phase_is_a_child_run_of_the_distill_run_with_its_curve(three_phases):
    _, tracker, _ = three_phases
    runs = phase_runs(tracker)
    assert set(runs) == {"sft", "logit_kd", "grpo"}
    parents = {r.data.tags["mlflow.parentRunId"] for r in runs.values()}
    assert len(parents) == 1 and tracker.client.get_run(parents.pop()).data.tags["distilflow.stage"] == "distill"
    for phase, metric in (("sft", "sft.loss"), ("logit_kd", "logit_kd.loss"), ("grpo", "grpo.reward")):
        history = tracker.client.get_metric_history(runs[phase].info.run_id, metric)
        assert history and history[-1].step > 0, phase
        assert "student.task_score" in runs[phase].data.metrics


def test_each_phase_logs_its_effective_training_settings(three_phases):
    _, tracker, _ = three_phases
    for run in phase_runs(tracker).values():
        assert run.data.metrics["effective.world_size"] == 1 and run.data.metrics["effective.bf16"] == 0
        assert 0 < run.data.metrics["effective.trainable_params"] < run.data.metrics["effective.total_params"]


def test_each_phases_trainer_ran_with_the_configs_trainer_arguments(three_phases, tmp_path):
    _, tracker, _ = three_phases
    for phase, run in phase_runs(tracker).items():
        logged = Path(tracker.client.download_artifacts(run.info.run_id, "effective_training_args.json", tmp_path))
        args = json.loads(logged.read_text())
        assert {key: args[key] for key in TRAINER_SETTINGS} == TRAINER_SETTINGS, phase
        assert (args["max_steps"], args["logging_steps"], args["gradient_checkpointing"]) == (
            {"sft": 4, "logit_kd": 4, "grpo": 2}[phase], 1, False)


def test_offline_logit_kd_reuses_the_cached_teacher_logits_in_the_workdir(three_phases):
    cfg, tracker, _ = three_phases
    cache = phase_runs(tracker)["logit_kd"].data.tags["distilflow.teacher_logits"]
    assert Path(cache).parent == cfg.run.workdir / "artifacts" / "teacher_logits"
    assert (Path(cache) / teacher_logits.FILE).is_file()


def test_the_published_student_is_the_last_phases_model(three_phases):
    _, _, result = three_phases
    assert (result.student / "model.safetensors").is_file()
    assert result.metrics["student.task_score"] == result.last_phase.task_score
    for phase in ("sft", "logit_kd", "grpo"):
        assert (result.directory / f"student_eval_{phase}.json").is_file()


# --- resume -----------------------------------------------------------------------------------------------

RESUMABLE = {"distill.phases": ["sft", "logit_kd"], "distill.logit_kd.max_steps": 24,
             "distill.logit_kd.save_steps": 3}
CHILD = """
import json, sys
from distilflow.configs.loader import load_config
from distilflow.tasks.stages import run_stage
cfg = load_config(sys.argv[1], {"run.workdir": sys.argv[2], **json.loads(sys.argv[3])})
run_stage("distill", cfg, run_stage("prototype", cfg))
"""


def test_a_killed_run_resumes_at_its_phase_and_checkpoint_with_the_step_count_continuing(tmp_path, tiny_prototype):
    work = with_stages(tmp_path / "work", tiny_prototype)  # the training subprocess reuses it too
    cfg = load_config(TINY_CONFIG, {"run.workdir": str(work), **RESUMABLE})
    prototype = run_stage("prototype", cfg)
    child = subprocess.Popen([sys.executable, "-c", CHILD, str(TINY_CONFIG), str(work), json.dumps(RESUMABLE)],
                             cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    checkpoints = work / "checkpoints" / "distill"
    deadline = time.monotonic() + 600
    while not list(checkpoints.glob("*/logit_kd/checkpoint-*/trainer_state.json")):
        assert child.poll() is None, "the training subprocess ended before it could be killed"
        assert time.monotonic() < deadline, "no logit_kd checkpoint within 10 minutes"
        time.sleep(0.1)
    os.kill(child.pid, signal.SIGKILL)
    child.wait()
    assert list(checkpoints.glob("*/sft/model/config.json")), "sft finished and kept its model"
    killed_at = max(int(p.name.split("-")[1]) for p in checkpoints.glob("*/logit_kd/checkpoint-*")
                    if (p / "trainer_state.json").is_file())

    records = tmp_path / "rerun.jsonl"
    run_stage("distill", cfg, prototype, tracker=FileTracker(records))
    logged = [json.loads(line) for line in records.read_text().splitlines()]
    steps = [r["step"] for r in logged if "metrics" in r and "logit_kd.loss" in r["metrics"]]
    assert not any("metrics" in r and "sft.loss" in r["metrics"] for r in logged), "sft was not trained again"
    assert steps[0] == killed_at + 1 and steps[-1] == 24


@pytest.mark.slow
def test_two_processes_train_a_phase_together_and_publish_one_model(tmp_path):
    cfg = load_config(TINY_CONFIG, {"run.workdir": str(tmp_path), "distill.processes": 2})
    records = tmp_path / "records.jsonl"
    prototype = run_stage("prototype", cfg)
    result = run_stage("distill", cfg, prototype, tracker=FileTracker(records))
    metrics = {k: v for line in records.read_text().splitlines()
               for k, v in json.loads(line).get("metrics", {}).items()}
    assert metrics["effective.world_size"] == 2
    assert (result.student / "model.safetensors").is_file()


def test_the_recipe_study_shares_the_demos_task_and_workdir_and_runs_every_phase():
    demo = load_config(REPO / "configs" / "demo.yaml")
    study = load_config(REPO / "configs" / "recipe-study.yaml")
    assert all(getattr(demo, part) == getattr(study, part) for part in ("task", "eval"))
    assert (demo.run.workdir, demo.run.seed, demo.run.device) == (study.run.workdir, study.run.seed, study.run.device)
    assert study.distill.phases == ["sft", "logit_kd", "grpo"] and study.distill.logit_kd.teacher_logits == "choices"


def test_launched_workers_see_as_many_gpus_as_processes_the_first_of_those_visible():
    cfg = load_config(TINY_CONFIG, {"distill.processes": 2}).distill
    env = distill.launch_env(cfg, torch.device("cuda"), {"CUDA_VISIBLE_DEVICES": "3,5,6", "PATH": "/bin"})
    assert env == {"CUDA_VISIBLE_DEVICES": "3,5", "PATH": "/bin"}


def test_launched_workers_on_the_cpu_keep_the_environment():
    cfg = load_config(TINY_CONFIG).distill
    assert distill.launch_env(cfg, torch.device("cpu"), {"PATH": "/bin"}) == {"PATH": "/bin"}
