"""Bad input through the command line, the way a user meets it: `distilflow run` exits 2 with one message
that names the file or key and the fix, and leaves nothing that looks finished: no published stage
artifact in the workdir, and in MLflow only runs marked FAILED, with no artifacts.

One case per kind of input (config file, task data, run settings, environment, model files); tests of each
message in detail live beside the code that raises it (test_config, test_data, test_model_loading, ...).
"""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from mlflow import MlflowClient
from transformers import AutoModelForCausalLM

from distilflow.flows.cli import main
from distilflow.tasks import gguf_export
from tests.conftest import REPO, TINY_CONFIG, TINY_TEACHER

DATA = REPO / "configs" / "data" / "support_tickets.jsonl"


@pytest.fixture(scope="module", autouse=True)
def prefect_server():
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield


def yaml_syntax_error(tmp_path):
    broken = tmp_path / "broken.yaml"
    broken.write_text(TINY_CONFIG.read_text().replace("  seed: 0\n", "  seed: [0\n"))
    return broken, [], [f"{broken}: line", "not valid YAML"]


def label_outside_the_choices(tmp_path):
    rows = [json.loads(line) for line in DATA.read_text().splitlines()]
    rows[3]["label"] = "refunds"
    data = tmp_path / "tickets.jsonl"
    data.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return TINY_CONFIG, [f"task.data={data}"], [f"{data}: example 4 has label 'refunds'", "not one of ['payment', 'delivery', 'bug', 'account']",
                                         "correct the example, or task.check"]


def gpu_without_a_gpu(tmp_path):
    return TINY_CONFIG, ["run.device=cuda"], ["run.device is 'cuda' but no GPU is visible", "run.device: auto or cpu"]


def api_key_not_in_the_environment(tmp_path):
    teacher = "{base_url: 'http://127.0.0.1:9/v1', model: m, api_key_env: DISTILFLOW_TEST_UNSET_KEY}"
    return TINY_CONFIG, [f"prototype.teacher={teacher}", f"distill.student={{path: {TINY_TEACHER}}}"], \
        ["prototype.teacher.api_key_env: environment variable DISTILFLOW_TEST_UNSET_KEY is not set",
         "export DISTILFLOW_TEST_UNSET_KEY="]


def teacher_with_only_pickle_weights(tmp_path):
    teacher = shutil.copytree(TINY_TEACHER, tmp_path / "teacher")
    (teacher / "model.safetensors").unlink()
    torch.save(AutoModelForCausalLM.from_pretrained(TINY_TEACHER).state_dict(), teacher / "pytorch_model.bin")
    return TINY_CONFIG, [f"prototype.teacher.path={teacher}"], \
        ["prototype.teacher.path", "pytorch_model.bin", "prototype.teacher.allow_pickle: true"]


def teacher_with_a_corrupted_safetensors_file(tmp_path):
    teacher = shutil.copytree(TINY_TEACHER, tmp_path / "teacher")
    weights = teacher / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    return TINY_CONFIG, [f"prototype.teacher.path={teacher}"], \
        [f"prototype.teacher: a safetensors file in {teacher} is corrupted or truncated", "replace it"]


@pytest.mark.parametrize("bad_input", [yaml_syntax_error, label_outside_the_choices, gpu_without_a_gpu,
                                       api_key_not_in_the_environment, teacher_with_only_pickle_weights,
                                       teacher_with_a_corrupted_safetensors_file], ids=lambda case: case.__name__)
def test_bad_input_exits_2_with_its_message_and_leaves_nothing_finished(tmp_path, capsys, monkeypatch, bad_input):
    monkeypatch.delenv("DISTILFLOW_TEST_UNSET_KEY", raising=False)
    workdir = tmp_path / "work"
    config, overrides, message = bad_input(tmp_path)
    code = main(["run", str(config), "--set", f"run.workdir={workdir}",
                 *[arg for override in overrides for arg in ("--set", override)]])
    error = capsys.readouterr().err
    assert code == 2
    assert all(part in error for part in message), error[-2000:]
    assert_nothing_finished(workdir)


def assert_nothing_finished(workdir: Path) -> None:
    """No stage artifact published, and any MLflow run the pipeline started is FAILED and holds no artifact."""
    published = [p for p in workdir.glob("artifacts/*/*") if p.is_dir() and not p.name.startswith(".")]
    assert published == []
    if (workdir / "mlflow.db").exists():
        client = MlflowClient(f"sqlite:///{workdir / 'mlflow.db'}")
        runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
        assert {run.info.status for run in runs} <= {"FAILED"}
    assert [p for p in workdir.glob("mlartifacts/**/*") if p.is_file()] == []


def test_the_distilflow_command_exits_2_on_a_truncated_gguf_teacher_with_nothing_finished(tmp_path):
    """The installed console script, in its own process, as a shell or a scheduler runs it."""
    (tmp_path / "teacher").mkdir()
    gguf = gguf_export.export(TINY_TEACHER, tmp_path / "teacher" / "teacher.gguf", "f16", name="tiny")
    gguf.write_bytes(gguf.read_bytes()[:gguf.stat().st_size // 2])
    workdir = tmp_path / "work"
    finished = subprocess.run(
        [str(Path(sys.executable).with_name("distilflow")), "run", str(TINY_CONFIG), "--set", f"run.workdir={workdir}",
         "--set", f"prototype.teacher={{path: {gguf.parent}, gguf_file: teacher.gguf}}"],
        capture_output=True, text=True, env=os.environ.copy(), timeout=300)
    assert finished.returncode == 2, finished.stderr[-3000:]
    assert f"error: prototype.teacher.gguf_file: {gguf} is not a complete GGUF file" in finished.stderr
    assert_nothing_finished(workdir)


def test_a_failing_run_ends_with_one_error_line_and_the_traceback_in_its_log(tmp_path):
    """A user's check function that raises mid-stage: no Prefect traceback on the console, one `error:` line that
    names the function and the answer, and the log file (named there) holds the traceback."""
    (tmp_path / "my_checks.py").write_text(  # fine on every label; the teacher's free answers break it
        "def strict(answer, row):\n    return {'payment': 1.0, 'delivery': 1.0, 'bug': 1.0, 'account': 1.0}[answer]\n")
    workdir = tmp_path / "work"
    finished = subprocess.run(
        [str(Path(sys.executable).with_name("distilflow")), "run", str(TINY_CONFIG), "--set", f"run.workdir={workdir}",
         "--set", f"task.check={{type: python, function: {tmp_path / 'my_checks.py'}:strict}}"],
        capture_output=True, text=True, env=os.environ.copy(), timeout=600)
    assert finished.returncode == 2, finished.stderr[-3000:]
    errors = [line for line in finished.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "my_checks.py:strict raised KeyError" in errors[0] and "scoring its label" not in errors[0]
    assert "Traceback" not in finished.stderr and " ERROR " not in finished.stderr
    log = Path(finished.stderr.split("(the log, with the traceback: ")[1].split(")")[0])
    assert log.parent == workdir / "logs" and "Traceback" in log.read_text()


def test_verbose_prints_the_traceback_too(tmp_path, capsys):
    assert main(["verify", str(tmp_path / "nowhere"), "--verbose"]) == 2
    err = capsys.readouterr().err
    assert "Traceback" in err and err.rstrip().splitlines()[-1].startswith("error: ")
