"""Stage outputs: published whole or not at all, reused only while they match their manifest."""

import json

import pytest

from distilflow.tasks import artifacts
from distilflow.tasks.artifacts import StageResult


def producer(calls: list, content: str = "weights"):
    def produce(out_dir):
        calls.append(out_dir)
        (out_dir / "model").mkdir()
        (out_dir / "model" / "weights.bin").write_text(content)
        return StageResult(stage="demo", files={"model": "model"}, metrics={"score": 1.0})
    return produce


def test_first_run_publishes_result_and_manifest(tmp_path):
    calls = []
    result = artifacts.cached_or_run("demo", "k1", tmp_path, producer(calls))
    assert result.directory == tmp_path / "artifacts" / "demo" / "k1"
    assert result.path("model").joinpath("weights.bin").read_text() == "weights"
    assert not result.cached and result.digest
    manifest = json.loads((result.directory / "manifest.json").read_text())["files"]
    assert set(manifest) == {"model/weights.bin", "result.json"}


def test_second_run_reuses_the_verified_artifact(tmp_path):
    calls = []
    first = artifacts.cached_or_run("demo", "k1", tmp_path, producer(calls))
    second = artifacts.cached_or_run("demo", "k1", tmp_path, producer(calls))
    assert len(calls) == 1 and second.cached and second.digest == first.digest
    assert second.metrics == {"score": 1.0}


@pytest.mark.parametrize("damage", ["edit", "delete", "add"])
def test_a_damaged_artifact_is_recomputed(tmp_path, damage):
    calls = []
    result = artifacts.cached_or_run("demo", "k1", tmp_path, producer(calls))
    weights = result.path("model") / "weights.bin"
    if damage == "edit":
        weights.write_text("tampered")
    elif damage == "delete":
        weights.unlink()
    else:
        (result.directory / "stray.txt").write_text("?")
    again = artifacts.cached_or_run("demo", "k1", tmp_path, producer(calls))
    assert len(calls) == 2 and not again.cached
    assert (again.path("model") / "weights.bin").read_text() == "weights"
    assert not (again.directory / "stray.txt").exists()


def test_a_crash_leaves_no_artifact_and_no_partial_dir(tmp_path):
    def crash(out_dir):
        (out_dir / "half.bin").write_text("half")
        raise RuntimeError("killed")

    with pytest.raises(RuntimeError):
        artifacts.cached_or_run("demo", "k1", tmp_path, crash)
    stage_dir = tmp_path / "artifacts" / "demo"
    assert [p.name for p in stage_dir.iterdir()] == ["k1.lock"]


def test_manifest_problems_name_each_difference(tmp_path):
    (tmp_path / "a.txt").write_text("a")
    (tmp_path / "b.txt").write_text("b")
    artifacts.write_manifest(tmp_path)
    (tmp_path / "a.txt").write_text("A")
    (tmp_path / "b.txt").unlink()
    (tmp_path / "c.txt").write_text("c")
    assert artifacts.manifest_problems(tmp_path) == ["missing: b.txt", "not in manifest: c.txt", "changed: a.txt"]


def test_stage_key_changes_with_any_input():
    base = artifacts.stage_key("distill", {"lora": {"r": 16}}, "upstream-digest")
    assert base == artifacts.stage_key("distill", {"lora": {"r": 16}}, "upstream-digest")
    assert base != artifacts.stage_key("distill", {"lora": {"r": 8}}, "upstream-digest")
    assert base != artifacts.stage_key("distill", {"lora": {"r": 16}}, "other-digest")
    assert base != artifacts.stage_key("compress", {"lora": {"r": 16}}, "upstream-digest")


def test_a_crashed_runs_partial_dir_is_cleared_by_the_next_run(tmp_path):
    stale = tmp_path / "artifacts" / "demo" / ".k1.partial-deadbeef"
    stale.mkdir(parents=True)
    (stale / "half.bin").write_text("half")
    artifacts.cached_or_run("demo", "k1", tmp_path, producer([]))
    assert not stale.exists()


def test_a_file_is_replaced_only_when_its_new_content_is_complete(tmp_path):
    record = tmp_path / "run.json"
    record.write_text("old")
    with pytest.raises(RuntimeError), artifacts.published(record) as partial:
        partial.write_text("half")
        raise RuntimeError("killed mid-write")
    assert record.read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["run.json"]
    with artifacts.published(record) as partial:
        partial.write_text("new")
    assert record.read_text() == "new" and [p.name for p in tmp_path.iterdir()] == ["run.json"]


def test_a_directory_is_replaced_whole_and_a_crashed_writes_leftover_cleared(tmp_path):
    model = tmp_path / "model"
    model.mkdir()
    (model / "old.bin").write_text("old")
    (tmp_path / ".model.partial-deadbeef").mkdir()  # a crashed writer's
    with artifacts.published(model) as partial:
        partial.mkdir()
        (partial / "new.bin").write_text("new")
    assert [p.name for p in model.iterdir()] == ["new.bin"]
    assert [p.name for p in tmp_path.iterdir()] == ["model"]
