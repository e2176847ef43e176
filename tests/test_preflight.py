"""What `distilflow validate` and every run check before the first stage: model files, the student's size, the
run history's home, and the MLflow store (made whole or not at all; a damaged one named; runs a killed process
left RUNNING closed by the next run)."""

import errno
import json
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import textwrap

import pytest
from mlflow import MlflowClient

from distilflow.flows.cli import main
from distilflow.tasks.errors import DistilflowError
from distilflow.tasks.tracking import MlflowTracker, open_store
from tests.conftest import TINY_CONFIG, TINY_TEACHER


def validate_error(capsys, *overrides: str) -> str:
    assert main(["validate", str(TINY_CONFIG), *[a for o in overrides for a in ("--set", o)]]) == 2
    return capsys.readouterr().err


def teacher_copy(tmp_path, drop: tuple[str, ...] = ()):
    teacher = shutil.copytree(TINY_TEACHER, tmp_path / "teacher")
    for pattern in drop:
        for path in teacher.glob(pattern):
            path.unlink()
    return teacher


def test_an_empty_teacher_directory_is_named_as_empty(tmp_path, capsys):
    (tmp_path / "teacher").mkdir()
    error = validate_error(capsys, f"prototype.teacher.path={tmp_path / 'teacher'}")
    assert f"prototype.teacher.path: {tmp_path / 'teacher'} is empty" in error and "sentencepiece" not in error


def test_a_directory_that_is_no_model_is_named(tmp_path, capsys):
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "README.md").write_text("my notes")
    assert "is not a model directory (no config.json; it holds README.md)" in validate_error(
        capsys, f"prototype.teacher.path={tmp_path / 'notes'}")


def test_a_weights_file_given_as_the_teacher_path_asks_for_its_directory(capsys):
    error = validate_error(capsys, f"prototype.teacher.path={TINY_TEACHER / 'model.safetensors'}")
    assert "model.safetensors is a file; give the directory" in error


def test_a_model_directory_without_weights_is_named(tmp_path, capsys):
    teacher = teacher_copy(tmp_path, drop=("*.safetensors",))
    assert "has a config.json but no weights (*.safetensors)" in validate_error(capsys, f"prototype.teacher.path={teacher}")


def test_a_model_directory_without_a_tokenizer_is_named(tmp_path, capsys):
    teacher = teacher_copy(tmp_path, drop=("tokenizer*", "vocab.json", "merges.txt", "special_tokens_map.json"))
    assert "has no tokenizer" in validate_error(capsys, f"prototype.teacher.path={teacher}")


def test_a_gguf_file_that_is_not_gguf_is_named(tmp_path, capsys):
    (tmp_path / "model.gguf").write_text("<html>404 Not Found</html>")
    error = validate_error(capsys, f"prototype.teacher={{path: {tmp_path}, gguf_file: model.gguf}}")
    assert f"prototype.teacher.gguf_file: {tmp_path / 'model.gguf'} is not a GGUF file" in error


def test_an_empty_student_directory_is_named_under_its_key(tmp_path, capsys):
    (tmp_path / "student").mkdir()
    assert "distill.student.path: " in validate_error(capsys, f"distill.student={{path: {tmp_path / 'student'}}}")


def test_a_distilflow_home_that_is_a_file_fails_validate(tmp_path, capsys, monkeypatch):
    (tmp_path / "home").write_text("")
    monkeypatch.setenv("DISTILFLOW_HOME", str(tmp_path / "home"))
    assert f"DISTILFLOW_HOME {tmp_path / 'home'}: cannot write in {tmp_path / 'home'}" in validate_error(capsys)


# ---- the MLflow store ---------------------------------------------------------------------------------------

def in_subprocess(code: str, file_size_limit: int | None = None) -> subprocess.CompletedProcess:
    """``code`` in a fresh Python; with ``file_size_limit``, no file may grow past it (a full disk, as a write
    past the limit fails with EFBIG)."""
    limit = textwrap.dedent(f"""
        import resource, signal
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, ({file_size_limit}, {file_size_limit}))
    """) if file_size_limit else ""
    return subprocess.run([sys.executable, "-c", limit + textwrap.dedent(code)], capture_output=True, text=True,
                          timeout=300)


def test_a_full_disk_while_the_store_is_made_leaves_no_store_and_says_so(tmp_path):
    database = tmp_path / "mlflow.db"
    done = in_subprocess(f"""
        from distilflow.tasks.errors import DistilflowError
        from distilflow.tasks.tracking import open_store
        try:
            open_store("sqlite:///{database}")
        except DistilflowError as err:
            print("error:", err)
    """, file_size_limit=150_000)
    assert f"error: cannot create the MLflow store {database}" in done.stdout, done.stderr[-2000:]
    assert "Free space" in done.stdout
    assert sorted(p.name for p in tmp_path.iterdir()) == []
    open_store(f"sqlite:///{database}").search_experiments()  # room again: it is made


def half_made_store(database) -> None:
    """What an interrupted MLflow of the previous version left: some tables, no finished migration."""
    in_subprocess(f"""
        from mlflow import MlflowClient
        MlflowClient("sqlite:///{database}").search_experiments()
    """, file_size_limit=200_000)
    assert database.exists()


def test_a_half_made_store_is_named_with_how_to_start_afresh(tmp_path):
    database = tmp_path / "mlflow.db"
    half_made_store(database)
    with pytest.raises(DistilflowError) as caught:
        open_store(f"sqlite:///{database}")
    assert f"{database}: the MLflow store is damaged" in str(caught.value)
    assert f"It holds no run (its creation was interrupted, e.g. by a full disk): move it away, e.g. `mv {database} " \
           in str(caught.value)


def test_a_damaged_store_that_holds_runs_is_named_with_what_to_do(tmp_path):
    database = tmp_path / "mlflow.db"
    in_subprocess(f"""
        from mlflow import MlflowClient
        client = MlflowClient("sqlite:///{database}")
        client.create_run(client.create_experiment("tiny"))
    """)  # elsewhere: MLflow keeps one engine per store in a process
    with sqlite3.connect(database) as connection:
        connection.execute("DROP TABLE alembic_version")
    with pytest.raises(DistilflowError, match="It holds runs: back it up, then try `mlflow db upgrade"):
        open_store(f"sqlite:///{database}")


def test_the_next_run_closes_runs_a_killed_process_left_running_and_only_those(tmp_path):
    uri, alive = f"sqlite:///{tmp_path / 'mlflow.db'}", tmp_path / "running"
    killed = in_subprocess(f"""
        import os, signal
        from pathlib import Path
        from distilflow.tasks.tracking import MlflowTracker
        tracker = MlflowTracker.start({uri!r}, "tiny", Path({str(tmp_path)!r}), "killed", {{}},
                                      liveness_dir=Path({str(alive)!r}))
        with tracker.child("distill") as stage, stage.child("sft"):
            print(tracker.run_id, flush=True)
            os.kill(os.getpid(), signal.SIGKILL)
    """)
    killed_run = killed.stdout.split()[0]
    running = MlflowTracker.start(uri, "tiny", tmp_path, "still-running", {}, liveness_dir=alive)
    newest = MlflowTracker.start(uri, "tiny", tmp_path, "newest", {}, liveness_dir=alive)
    closed = newest.close_stale_runs()

    client = MlflowClient(uri)
    assert [run.info.run_id for run in closed] == [killed_run]
    runs = {run.info.run_name: run for run in client.search_runs([client.get_experiment_by_name("tiny").experiment_id])}
    assert {name: runs[name].info.status for name in ("killed", "distill", "sft", "still-running")} == \
        {"killed": "KILLED", "distill": "KILLED", "sft": "KILLED", "still-running": "RUNNING"}
    assert "ended without closing it" in runs["sft"].data.tags["distilflow.end_reason"]
    running.finish()
    newest.finish()



def test_a_stop_that_breaks_ending_a_stage_run_keeps_its_error_and_the_pipeline_run_ends_it(tmp_path, monkeypatch):
    """SIGTERM inside an MLflow call of the stage's client can leave that client unable to end the stage's run: the
    stop is still what the pipeline sees, and ending the pipeline's run ends the stage's (and its phase's) KILLED."""
    from mlflow.exceptions import MlflowException
    from prefect.exceptions import TerminationSignal

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    pipeline = MlflowTracker.start(uri, "tiny", tmp_path, "stopped", {})
    stage_client = open_store(uri)
    attached = MlflowTracker(stage_client, pipeline.run_id)
    with pytest.raises(TerminationSignal) as stopped:
        with attached.child("distill") as stage, stage.child("sft"):
            monkeypatch.setattr(stage_client, "set_terminated", lambda *args: (_ for _ in ()).throw(
                MlflowException("(sqlite3.OperationalError) database is locked")))
            raise TerminationSignal(signal.SIGTERM)
    pipeline.finish(stopped.value)

    client = MlflowClient(uri)
    runs = client.search_runs([client.get_experiment_by_name("tiny").experiment_id])
    assert {run.info.run_name: run.info.status for run in runs} == {"stopped": "KILLED", "distill": "KILLED",
                                                                   "sft": "KILLED"}


def test_validate_counts_the_examples_longer_than_distills_max_length(capsys):
    assert main(["validate", str(TINY_CONFIG), "--set", "distill.sft.max_length=40"]) == 0
    err = capsys.readouterr().err
    assert "warning: 64 of 64 examples are longer than distill.sft.max_length, 40 tokens" in err


def test_a_full_disk_anywhere_in_an_errors_chain_is_said_in_a_sentence():
    from distilflow.tasks.environment import problem

    full = OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))  # as raised by a write (no /dev/full on every machine)
    try:
        raise RuntimeError("safetensors: failed writing") from full
    except RuntimeError as wrapped:
        assert problem(wrapped).startswith("a disk is full; free space")
    assert problem(ValueError("a bug")) is None


def test_a_hub_id_this_machine_cannot_fetch_is_named_before_the_first_stage(capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # no hub here either way; offline answers at once
    error = validate_error(capsys, "prototype.teacher.path=distilflow-test/no-such-model")
    assert "prototype.teacher.path: 'distilflow-test/no-such-model' is no local directory" in error


def qwen2_directory(tmp_path):
    teacher = teacher_copy(tmp_path)
    config = json.loads((teacher / "config.json").read_text())
    (teacher / "config.json").write_text(json.dumps({**config, "model_type": "qwen2"}))
    return [f"prototype.teacher.path={teacher}"]


def qwen2_gguf_file(tmp_path):
    """A GGUF file that says it holds a Qwen2 model (metadata only: preflight reads no more)."""
    import gguf

    writer = gguf.GGUFWriter(tmp_path / "qwen.gguf", "qwen2")
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return [f"prototype.teacher.path={tmp_path}", "prototype.teacher.gguf_file=qwen.gguf"]


@pytest.mark.parametrize("teacher", [qwen2_directory, qwen2_gguf_file], ids=["hf-directory", "gguf-file"])
def test_a_gguf_export_of_a_student_made_from_a_teacher_of_another_family_is_refused_before_training(
        tmp_path, capsys, teacher):
    """A student made from a Qwen teacher's layers trained, was quantized, then failed at deploy's GGUF export."""
    error = validate_error(capsys, *teacher(tmp_path), "deploy.gguf=q4_0")
    assert "deploy.gguf: q4_0 exports Llama-family decoders, but the student is made from prototype.teacher, a qwen2 " \
           "model" in error
