"""Serving measurements on the tiny model: exported to GGUF, served by llama.cpp's server in its own process,
asked over HTTP; the cost arithmetic; the engine-parity gate; states that have no servable form."""

import os
from dataclasses import replace
from pathlib import Path

import pytest

from distilflow.configs.loader import load_config
from distilflow.configs.schema import CostConfig, GateConfig, ServingConfig
from distilflow.tasks import checks, data, deploy, gguf_export, journey, registry, serving
from distilflow.tasks.errors import DistilflowError
from distilflow.tasks.journey import JourneyEntry
from tests.conftest import REPO, TINY_CONFIG, TINY_TEACHER

FAST = ServingConfig(concurrency=2, decode_tokens=8, speed_repeats=1, latency_requests=3)
CPU = serving.Engine(serving.LLAMA_CPP, "cpu", "cpu", usd_per_hour=0.08, threads=2)


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory):
    return gguf_export.export(TINY_TEACHER, tmp_path_factory.mktemp("gguf") / "tiny-q4_0.gguf", "q4_0", name="tiny")


@pytest.fixture(scope="module")
def workload():
    cfg = load_config(TINY_CONFIG)
    return serving.Workload(data.load_task_data(cfg.task, cfg.run.seed).eval[:6], cfg.task)


@pytest.fixture(scope="module")
def measured(tiny_gguf, workload):
    return serving.measure(tiny_gguf, CPU, workload, FAST)


def test_engine_measures_every_journey_field_of_the_served_gguf(measured, tiny_gguf):
    assert set(serving.SERVING_FIELDS) <= set(measured)
    assert measured["engine"] == "llama.cpp" and measured["device"] == "cpu"
    assert measured["artifact"] == "tiny-q4_0.gguf" and measured["artifact_bytes"] == tiny_gguf.stat().st_size
    for key in ("batch1_tokens_per_s", "ttft_s", "latency_p50_s", "throughput_tokens_per_s", "peak_memory_mb"):
        assert measured[key] > 0, key
    assert measured["latency_p50_s"] <= measured["latency_p95_s"]
    assert measured["concurrency"] == 2 and measured["latency_requests"] == 3


def test_engine_answers_every_held_out_request_within_the_grammar_and_scores_them(measured, workload):
    assert len(measured["answers"]) == measured["task_requests"] == len(workload.rows)
    assert set(measured["answers"]) <= set(workload.task.check.choices)
    expected = sum(a == checks.label(r, workload.task) for a, r in zip(measured["answers"], workload.rows))
    assert measured["task_score"] == expected / len(workload.rows)


def test_peak_memory_is_the_server_process_own_not_the_pipeline_that_started_it(measured):
    assert measured["peak_memory_mb"] < 200  # the test process, torch loaded, holds several hundred MB


def test_server_runs_in_its_own_process_and_is_stopped_by_its_pid(tiny_gguf):
    with serving.serve(tiny_gguf, CPU, FAST) as server:
        assert server.pid != os.getpid() and server.base_url.startswith("http://127.0.0.1:")
        os.kill(server.pid, 0)  # alive
    with pytest.raises(ProcessLookupError):
        os.kill(server.pid, 0)
    assert server.peak_memory_mb > 0


def test_a_gguf_the_engine_refuses_is_an_error_naming_the_file(tiny_gguf, tmp_path):
    truncated = tmp_path / "truncated.gguf"
    truncated.write_bytes(tiny_gguf.read_bytes()[:4096])
    with pytest.raises(DistilflowError, match=f"{truncated}: llama.cpp refused to load this GGUF file"):
        with serving.serve(truncated, CPU, FAST):
            pass


def test_a_prompt_longer_than_the_context_is_an_error_naming_eval_serving_context_tokens(tiny_gguf, workload):
    many_shots = serving.Workload(workload.rows, workload.task, shots=tuple(workload.rows) * 4)  # ~1000 tokens
    with pytest.raises(DistilflowError, match="raise eval.serving.context_tokens"):
        serving.measure(tiny_gguf, CPU, many_shots, FAST.model_copy(update={"context_tokens": 64}))


def test_smoke_answers_by_free_generation_without_the_grammar(tiny_gguf, workload):
    answers = serving.smoke(tiny_gguf, workload.rows[:2], workload.task, 4, FAST)
    assert len(answers) == 2 and all(isinstance(a, str) for a in answers)


# --- cost ------------------------------------------------------------------------------------------------

def test_dollars_per_million_tokens_is_the_hourly_price_over_the_tokens_made_in_an_hour():
    assert serving.usd_per_mtok(3.6, 1000.0) == pytest.approx(1.0)  # 3.6M tokens an hour for $3.60
    assert serving.cost_entry({"usd_per_hour": 0.08, "batch1_tokens_per_s": 100.0, "throughput_tokens_per_s": 400.0}) \
        == pytest.approx({"batch1": 0.08 / 0.36, "throughput": 0.08 / 1.44})


def test_a_state_without_speed_or_price_has_no_cost():
    assert serving.cost_entry(serving.not_measured(CPU, "why")) == {"batch1": None, "throughput": None}


def test_vllm_in_its_own_environment_gets_that_pythonpath_and_the_engines_threading_defaults():
    environ = {"PATH": "/bin", "PYTHONPATH": "/site", "DISTILFLOW_VLLM_PYTHONPATH": "/site-vllm:/site"}
    assert serving.vllm_environment(environ) == {**environ, "PYTHONPATH": "/site-vllm:/site"}
    assert serving.vllm_environment({"PATH": "/bin", "OMP_WAIT_POLICY": "PASSIVE"}) == {"PATH": "/bin"}


def test_the_llama_cpp_server_runs_without_the_pipelines_omp_wait_policy(tiny_gguf, monkeypatch):
    """PASSIVE (the CLI's default, for torch) made llama.cpp's OpenMP threads sleep at every barrier: the demo's
    teacher decoded 26 tokens/s at batch 1 in the pipeline and 55 started on its own."""
    monkeypatch.setenv("OMP_WAIT_POLICY", "PASSIVE")
    with serving.serve(tiny_gguf, CPU, FAST) as server:
        environ = Path(f"/proc/{server.pid}/environ").read_bytes().split(b"\0")
    assert not [line for line in environ if line.startswith(b"OMP_WAIT_POLICY=")]
    assert f"PATH={os.environ['PATH']}".encode() in environ


def test_a_separate_vllm_environment_makes_vllm_the_gpu_engine_and_never_the_cpu_one(monkeypatch):
    monkeypatch.setenv("DISTILFLOW_VLLM_PYTHONPATH", "/site-vllm")
    assert serving.choose_engine(ServingConfig(), "cpu").name == serving.LLAMA_CPP
    monkeypatch.setattr("torch.cuda.get_device_name", lambda *_: "NVIDIA H200")
    assert serving.choose_engine(ServingConfig(), "cuda").name == serving.VLLM


def test_cpu_price_is_per_vcpu_times_the_engines_threads():
    engine = serving.priced(serving.Engine(serving.LLAMA_CPP, "cpu", "cpu", threads=4), CostConfig())
    assert engine.usd_per_hour == pytest.approx(4 * CostConfig().usd_per_hour["cpu"])


def test_gpu_price_is_found_by_the_devices_name_prefix_at_a_dash():
    h100 = serving.Engine(serving.VLLM, "cuda", serving.device_kind("NVIDIA H100 80GB HBM3"))
    assert h100.device_kind == "nvidia-h100-80gb-hbm3"
    assert serving.priced(h100, CostConfig()).usd_per_hour == CostConfig().usd_per_hour["nvidia-h100"]
    with pytest.raises(DistilflowError, match="deploy.cost: no price for this run's device kind 'nvidia-h1000'"):
        serving.priced(serving.Engine(serving.VLLM, "cuda", "nvidia-h1000"), CostConfig())


def test_a_device_kind_missing_from_the_price_table_is_a_config_error_naming_deploy_cost(tmp_path):
    cfg = load_config(TINY_CONFIG, {"run.workdir": str(tmp_path), "deploy.cost.device_kind": "nvidia-a10g"})
    with pytest.raises(DistilflowError, match=r"deploy.cost: no price .* 'nvidia-a10g' .*usd_per_hour.nvidia-a10g="):
        serving.priced(serving.choose_engine(cfg.eval.serving, "cpu"), cfg.deploy.cost)


def test_user_prices_go_on_top_of_the_defaults():
    prices = CostConfig(usd_per_hour={"nvidia-a10g": 1.0, "cpu": 0.05}).usd_per_hour
    assert prices["nvidia-a10g"] == 1.0 and prices["cpu"] == 0.05 and "nvidia-h200" in prices


# --- engine parity --------------------------------------------------------------------------------------

def deployed(hf_score: float, engine_score: float, items: int = 80) -> JourneyEntry:
    return JourneyEntry("deployed", task_score=hf_score, size_bytes=1, smoke_latency_s=0.1,
                        serving={"engine": "llama.cpp", "artifact": "model-q4_0.gguf", "task_score": engine_score,
                                 "task_requests": items})


def test_engine_score_within_two_items_of_the_evaluators_passes_the_gate():
    checks = registry.gate_checks(GateConfig(), [deployed(0.925, 0.90)], champion_score=None)
    assert [(c.key, c.passed) for c in checks] == [("deploy.gate.max_engine_gap", True)]


def test_engine_score_that_diverges_fails_the_gate_with_both_numbers():
    [check] = registry.gate_checks(GateConfig(), [deployed(0.925, 0.85)], champion_score=None)
    assert not check.passed
    assert check.detail == ("task score 0.850 in llama.cpp (model-q4_0.gguf) vs 0.925 in the HF evaluator: "
                            "gap 0.075 > 0.025")


def test_auto_gap_is_two_items_or_two_percent_whichever_is_larger():
    assert registry.engine_parity("auto", deployed(0.5, 0.5 + 2 / 16, items=16)).passed
    assert not registry.engine_parity("auto", deployed(0.5, 0.5 + 3 / 16, items=16)).passed
    assert registry.engine_parity("auto", deployed(0.5, 0.52, items=1000)).passed  # 2% > 2 items of 1000
    assert not registry.engine_parity("auto", deployed(0.5, 0.53, items=1000)).passed


def test_a_deployed_artifact_that_was_not_served_is_not_checked_for_parity():
    entry = replace(deployed(0.9, 0.0), serving=serving.not_measured(CPU, "deploy.gguf is none"))
    assert registry.gate_checks(GateConfig(), [entry], champion_score=None) == []


# --- states without a servable form ---------------------------------------------------------------------

@pytest.fixture
def models(tmp_path):
    """A run with an HTTP teacher, trained through sft then grpo, not pruned, and no GGUF export."""
    return deploy.ServableModels(teacher=None, teacher_gguf=None, student=tmp_path / "student", student_phase="grpo",
                                 pruned=None, bundle=tmp_path, gguf_file=None)


@pytest.mark.parametrize("state, engine, gguf, why", [
    ("teacher", CPU, None, "an HTTP teacher: no weights to serve here"),
    ("quantized", CPU, None, "compressed-tensors: vLLM (GPU) only; on CPUs see deployed (GGUF)"),
    ("deployed", CPU, None, "deploy.gguf is none: no CPU artifact to serve"),
    ("deployed", None, "m.gguf", "eval.serving.engine is none"),
])
def test_a_state_without_a_servable_form_says_why(models, tmp_path, state, engine, gguf, why):
    form = deploy.servable_form(JourneyEntry(state), engine, replace(models, gguf_file=gguf and tmp_path / gguf))
    assert form == why


def test_only_the_last_phases_student_is_served(models, tmp_path):
    assert deploy.servable_form(JourneyEntry("student", phase="grpo"), CPU, models) == tmp_path / "student"
    assert deploy.servable_form(JourneyEntry("student", phase="sft"), CPU, models) == \
        "only the last phase's student is kept"


def test_journey_prints_a_serving_table_with_cost_and_the_reasons_states_were_not_served(measured):
    served = {k: v for k, v in measured.items() if k != "answers"}
    states = [JourneyEntry("teacher", task_score=0.5, perplexity=2.0, size_bytes=2e6, params=1e6, bits_per_param=16.0,
                           serving=served, cost_usd_per_mtok=serving.cost_entry(served)),
              JourneyEntry("quantized", task_score=0.5, perplexity=2.0, size_bytes=1e6, params=1e6, bits_per_param=8.0,
                           serving=serving.not_measured(CPU, "compressed-tensors: vLLM (GPU) only"))]
    table = journey.table(states)
    assert "| state | task score | 95% CI | retention | perplexity | size (MB) | params (M) | bits/param |" in table
    assert "tokens/s batch 1" in table and "$/1M tokens at 2" in table
    assert "| teacher | llama.cpp | tiny-q4_0.gguf |" in table
    assert "| quantized | llama.cpp | not served: compressed-tensors: vLLM (GPU) only |" in table


def test_a_gguf_teacher_is_served_from_the_file_it_came_as(models):
    from distilflow.tasks import package

    card = package.teacher_card(load_config(REPO / "configs" / "demo.yaml").prototype.teacher)
    assert Path(card["gguf_file"]).name == "SmolLM2-135M-Instruct.Q4_1.gguf" and Path(card["gguf_file"]).is_file()
    form = deploy.servable_form(JourneyEntry("teacher-gguf"), CPU, replace(models, teacher_gguf=card["gguf_file"]))
    assert form == Path(card["gguf_file"])
