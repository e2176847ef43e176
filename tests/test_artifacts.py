"""Stage outputs: published whole or not at all, reused only while they match their manifest."""

import json
import os
from dataclasses import dataclass

import pytest

from distilflow.tasks import artifacts
from distilflow.flows.cli import main
from distilflow.tasks.artifacts import InArtifact, StageOutput


@dataclass(kw_only=True)
class DemoOutput(StageOutput):
    model: InArtifact


def producer(calls: list, content: str = "weights"):
    def produce(out_dir):
        calls.append(out_dir)
        (out_dir / "model").mkdir()
        (out_dir / "model" / "weights.bin").write_text(content)
        return DemoOutput(model=out_dir / "model", metrics={"score": 1.0})
    return produce


def test_first_run_publishes_result_and_manifest(tmp_path):
    calls = []
    result = artifacts.cached_or_run("demo", "k1", tmp_path, producer(calls), DemoOutput)
    assert result.directory == tmp_path / "artifacts" / "demo" / "k1"
    assert result.model.joinpath("weights.bin").read_text() == "weights"
    assert not result.cached and result.digest
    manifest = json.loads((result.directory / "manifest.json").read_text())["files"]
    assert set(manifest) == {"model/weights.bin", "result.json"}
    assert json.loads((result.directory / "result.json").read_text())["model"] == "model"  # where it lies: its own


def test_second_run_reuses_the_verified_artifact(tmp_path):
    calls = []
    first = artifacts.cached_or_run("demo", "k1", tmp_path, producer(calls), DemoOutput)
    second = artifacts.cached_or_run("demo", "k1", tmp_path, producer(calls), DemoOutput)
    assert len(calls) == 1 and second.cached and second.digest == first.digest
    assert second.metrics == {"score": 1.0}


@pytest.mark.parametrize("damage", ["edit", "delete", "add"])
def test_a_damaged_artifact_is_recomputed(tmp_path, damage):
    calls = []
    result = artifacts.cached_or_run("demo", "k1", tmp_path, producer(calls), DemoOutput)
    weights = result.model / "weights.bin"
    if damage == "edit":
        weights.write_text("tampered")
    elif damage == "delete":
        weights.unlink()
    else:
        (result.directory / "stray.txt").write_text("?")
    again = artifacts.cached_or_run("demo", "k1", tmp_path, producer(calls), DemoOutput)
    assert len(calls) == 2 and not again.cached
    assert (again.model / "weights.bin").read_text() == "weights"
    assert not (again.directory / "stray.txt").exists()


def test_a_crash_leaves_no_artifact_and_no_partial_dir(tmp_path):
    def crash(out_dir):
        (out_dir / "half.bin").write_text("half")
        raise RuntimeError("killed")

    with pytest.raises(RuntimeError):
        artifacts.cached_or_run("demo", "k1", tmp_path, crash, DemoOutput)
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
    artifacts.cached_or_run("demo", "k1", tmp_path, producer([]), DemoOutput)
    assert not stale.exists()


def test_published_files_are_readable_by_anyone_even_when_written_private(tmp_path):
    def produce(out_dir):
        (out_dir / "model").mkdir(mode=0o700)
        weights = out_dir / "model" / "model.safetensors"
        weights.write_bytes(b"weights")
        weights.chmod(0o600)  # what safetensors writes
        return DemoOutput(model=out_dir / "model")

    result = artifacts.cached_or_run("demo", "k1", tmp_path, produce, DemoOutput)
    assert result.model.stat().st_mode & 0o555 == 0o555
    assert (result.model / "model.safetensors").stat().st_mode & 0o777 == 0o644


def signed_bundle(tmp_path):
    """A directory with files in a subdirectory and its manifest, as the deploy stage writes a bundle."""
    bundle = tmp_path / "bundle"
    (bundle / "gguf").mkdir(parents=True)
    (bundle / "model.safetensors").write_bytes(b"weights")
    (bundle / "gguf" / "model.gguf").write_bytes(b"gguf")
    artifacts.write_manifest(bundle)
    return bundle


def verify_error(bundle, capsys) -> str:
    assert main(["verify", str(bundle)]) == 2
    return capsys.readouterr().err


def test_verify_fails_a_symlinked_directory_added_to_the_bundle(tmp_path, capsys):
    bundle = signed_bundle(tmp_path)
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "elsewhere" / "payload.py").write_text("print('hi')")
    (bundle / "extra").symlink_to(tmp_path / "elsewhere")
    assert f"symlink: extra -> {tmp_path / 'elsewhere'}" in verify_error(bundle, capsys)


def test_verify_fails_a_symlink_loop_and_a_dangling_symlink(tmp_path, capsys):
    bundle = signed_bundle(tmp_path)
    (bundle / "gguf" / "loop").symlink_to("loop")
    (bundle / "dangling").symlink_to(tmp_path / "nothing-here")
    error = verify_error(bundle, capsys)
    assert "symlink: gguf/loop -> loop" in error and "symlink: dangling ->" in error


def test_verify_fails_weights_replaced_by_a_symlink_to_an_identical_file_outside(tmp_path, capsys):
    bundle = signed_bundle(tmp_path)
    outside = tmp_path / "outside.safetensors"
    outside.write_bytes(b"weights")
    (bundle / "model.safetensors").unlink()
    (bundle / "model.safetensors").symlink_to(outside)
    assert f"symlink: model.safetensors -> {outside} (a regular file in the manifest)" in verify_error(bundle, capsys)


def test_verify_fails_a_fifo_in_the_bundle(tmp_path, capsys):
    bundle = signed_bundle(tmp_path)
    os.mkfifo(bundle / "pipe")
    assert "not a regular file: pipe (fifo)" in verify_error(bundle, capsys)


def test_verify_accepts_a_symlink_the_manifest_lists_as_such(tmp_path, capsys):
    bundle = signed_bundle(tmp_path)
    (bundle / "latest.gguf").symlink_to("gguf/model.gguf")
    artifacts.write_manifest(bundle)
    assert main(["verify", str(bundle)]) == 0
    assert "and 1 symlinks match" in capsys.readouterr().out
    (bundle / "latest.gguf").unlink()
    (bundle / "latest.gguf").symlink_to("model.safetensors")
    assert "symlink: latest.gguf -> model.safetensors" in verify_error(bundle, capsys)


def test_verify_fails_a_manifest_that_is_a_symlink(tmp_path, capsys):
    bundle = signed_bundle(tmp_path)
    (tmp_path / "forged.json").write_text((bundle / "manifest.json").read_text())
    (bundle / "manifest.json").unlink()
    (bundle / "manifest.json").symlink_to(tmp_path / "forged.json")
    assert "manifest.json is a symlink" in verify_error(bundle, capsys)


def test_a_nested_manifest_is_covered_by_the_stage_manifest(tmp_path):
    bundle = signed_bundle(tmp_path)
    artifacts.write_manifest(tmp_path)
    (bundle / "manifest.json").write_text('{"files": {}}')
    assert artifacts.manifest_problems(tmp_path) == ["changed: bundle/manifest.json"]


@pytest.mark.parametrize("manifest", ["{not json", "[1, 2]", '{"files": {"a": 1}}', "\xff\xfe"])
def test_a_stage_artifact_with_a_corrupt_manifest_is_recomputed(tmp_path, manifest):
    calls = []
    artifacts.cached_or_run("demo", "k1", tmp_path, producer(calls), DemoOutput)
    (tmp_path / "artifacts" / "demo" / "k1" / "manifest.json").write_bytes(manifest.encode("latin-1"))
    result = artifacts.cached_or_run("demo", "k1", tmp_path, producer(calls), DemoOutput)
    assert len(calls) == 2 and not result.cached


def test_verify_never_reads_outside_the_bundle_for_a_manifest_entry_that_points_there(tmp_path, capsys):
    bundle = signed_bundle(tmp_path)
    (tmp_path / "secret.txt").write_text("outside")
    manifest = json.loads((bundle / "manifest.json").read_text())
    manifest["files"]["../secret.txt"] = artifacts.file_sha256(tmp_path / "secret.txt")
    (bundle / "manifest.json").write_text(json.dumps(manifest))
    assert "missing: ../secret.txt" in verify_error(bundle, capsys)
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
