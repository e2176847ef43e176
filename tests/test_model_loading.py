"""Models from outside distilflow: weights load from safetensors (or GGUF) only and a repository's own code
never runs unless the config opts in; damaged weight files are clear errors that name the key and the fix."""

import json
import shutil

import pytest
import torch
from transformers import AutoModelForCausalLM

from distilflow.configs.loader import load_config
from distilflow.configs.schema import LocalTeacherConfig, StudentConfig
from distilflow.tasks import gguf_export
from distilflow.tasks.errors import DistilflowError
from distilflow.tasks.models import load_model, load_teacher
from distilflow.tasks.prototype import loading_tags
from tests.conftest import TINY_CONFIG, TINY_TEACHER

CPU = torch.device("cpu")

REMOTE_CODE = """
from pathlib import Path
from transformers import LlamaConfig, LlamaForCausalLM

Path({marker!r}).write_text("the repository's code ran")


class MarkerConfig(LlamaConfig):
    model_type = "marker-llama"


class MarkerForCausalLM(LlamaForCausalLM):
    config_class = MarkerConfig
"""


def copy_of_tiny_teacher(directory):
    shutil.copytree(TINY_TEACHER, directory)
    return directory


@pytest.fixture(scope="module")
def pickle_only(tmp_path_factory):
    """The tiny teacher with its weights as pytorch_model.bin (a pickle) instead of safetensors."""
    directory = copy_of_tiny_teacher(tmp_path_factory.mktemp("pickle") / "model")
    (directory / "model.safetensors").unlink()
    torch.save(AutoModelForCausalLM.from_pretrained(TINY_TEACHER).state_dict(), directory / "pytorch_model.bin")
    return directory


@pytest.fixture
def remote_code(tmp_path):
    """A model whose config points at Python code shipped beside it; the code leaves a marker when it runs."""
    directory = copy_of_tiny_teacher(tmp_path / "model")
    marker = tmp_path / "code-ran"
    (directory / "marker.py").write_text(REMOTE_CODE.format(marker=str(marker)))
    config = json.loads((directory / "config.json").read_text())
    config.update(model_type="marker-llama", architectures=["MarkerForCausalLM"],
                  auto_map={"AutoConfig": "marker.MarkerConfig", "AutoModelForCausalLM": "marker.MarkerForCausalLM"})
    (directory / "config.json").write_text(json.dumps(config))
    return directory, marker


def error_of(load) -> str:
    with pytest.raises(DistilflowError) as caught:
        load()
    return str(caught.value)


# --- pickle checkpoints ------------------------------------------------------------------------------------

def test_a_teacher_with_only_pickle_weights_is_refused_naming_the_opt_in(pickle_only):
    message = error_of(lambda: load_teacher(LocalTeacherConfig(path=str(pickle_only)), CPU))
    assert f"prototype.teacher.path: {pickle_only}" in message and "pytorch_model.bin" in message
    assert "set prototype.teacher.allow_pickle: true if you trust" in message


def test_a_teacher_with_pickle_weights_loads_when_the_config_allows_pickle(pickle_only):
    model, _ = load_teacher(LocalTeacherConfig(path=str(pickle_only), allow_pickle=True), CPU)
    reference = AutoModelForCausalLM.from_pretrained(TINY_TEACHER)
    assert torch.equal(model.model.embed_tokens.weight, reference.model.embed_tokens.weight)


def test_a_student_with_only_pickle_weights_is_refused_naming_its_key(pickle_only):
    message = error_of(lambda: load_model(pickle_only, CPU, trust=StudentConfig(path=str(pickle_only)),
                                          key="distill.student"))
    assert "distill.student.path" in message and "distill.student.allow_pickle: true" in message


def test_a_judge_with_only_pickle_weights_is_refused_naming_its_key(pickle_only):
    cfg = LocalTeacherConfig(path=str(pickle_only))
    message = error_of(lambda: load_teacher(cfg, CPU, key="prototype.judge.teacher"))
    assert "prototype.judge.teacher.allow_pickle: true" in message


# --- repository code ---------------------------------------------------------------------------------------

def test_a_models_own_code_does_not_run_by_default(remote_code):
    directory, marker = remote_code
    message = error_of(lambda: load_teacher(LocalTeacherConfig(path=str(directory)), CPU))
    assert "ships its own model code" in message and "prototype.teacher.trust_remote_code: true" in message
    assert not marker.exists()


def test_a_models_own_code_runs_when_the_config_trusts_it(remote_code):
    directory, marker = remote_code
    model, _ = load_teacher(LocalTeacherConfig(path=str(directory), trust_remote_code=True), CPU)
    assert type(model).__name__ == "MarkerForCausalLM" and marker.exists()


def test_both_loading_choices_of_teacher_and_judge_are_recorded_as_tags():
    cfg = load_config(TINY_CONFIG, {"prototype.teacher.allow_pickle": True,
                                    "prototype.judge": {"rubric": "r", "teacher": {"path": str(TINY_TEACHER)}}})
    assert loading_tags(cfg.prototype) == {
        "distilflow.teacher.allow_pickle": "true", "distilflow.teacher.trust_remote_code": "false",
        "distilflow.judge.allow_pickle": "false", "distilflow.judge.trust_remote_code": "false"}


# --- damaged weight files ----------------------------------------------------------------------------------

@pytest.mark.parametrize("damage", ["truncated", "garbage"])
def test_a_corrupted_safetensors_file_is_named_with_the_fix(tmp_path, damage):
    directory = copy_of_tiny_teacher(tmp_path / "model")
    weights = directory / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:weights.stat().st_size // 2] if damage == "truncated"
                        else b"not a safetensors file" * 64)
    message = error_of(lambda: load_teacher(LocalTeacherConfig(path=str(directory)), CPU))
    assert f"prototype.teacher: a safetensors file in {directory} is corrupted or truncated" in message
    assert "replace it" in message


def test_a_corrupted_student_checkpoint_names_the_student_key(tmp_path):
    directory = copy_of_tiny_teacher(tmp_path / "student")
    (directory / "model.safetensors").write_bytes(b"\x00" * 100)
    message = error_of(lambda: load_model(directory, CPU, trust=StudentConfig(path=str(directory)),
                                          key="distill.student"))
    assert message.startswith("distill.student: a safetensors file") and "corrupted or truncated" in message


@pytest.fixture(scope="module")
def gguf_bytes(tmp_path_factory):
    return gguf_export.export(TINY_TEACHER, tmp_path_factory.mktemp("gguf") / "m.gguf", "f16", name="tiny").read_bytes()


@pytest.mark.parametrize("keep", ["header", "half"])
def test_a_truncated_gguf_file_is_named_with_the_fix(tmp_path, gguf_bytes, keep):
    (tmp_path / "teacher.gguf").write_bytes(gguf_bytes[:100] if keep == "header" else gguf_bytes[:len(gguf_bytes) // 2])
    message = error_of(lambda: load_teacher(LocalTeacherConfig(path=str(tmp_path), gguf_file="teacher.gguf"), CPU))
    assert f"prototype.teacher.gguf_file: {tmp_path / 'teacher.gguf'} is not a complete GGUF file" in message
    assert "truncated" in message and "replace it" in message
