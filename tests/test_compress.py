"""The compress stage: candidates built, evaluated from disk, charted, and the smallest within budget shipped."""

import json

import pytest

from distilflow.configs.loader import load_config
from distilflow.configs.schema import BudgetConfig
from distilflow.tasks import compress, journey
from distilflow.tasks.errors import DistilflowError
from distilflow.tasks.evaluate import Evaluation
from distilflow.tasks.stages import run_stage
from tests.conftest import REPO, TINY_CONFIG

PRUNE = {"depth": {"keep_layers": 1}, "width": {"mlp_ratio": 0.5}, "calibration_samples": 8,
         "heal": {"logit_kd": {"max_steps": 1, "per_device_train_batch_size": 4, "max_length": 96}}}
CANDIDATES = [{"quantize": {"method": "rtn"}}, {"quantize": {"scheme": "nf4"}},
              {"prune": True, "quantize": {"method": "rtn"}}]


def compress_config(**overrides):
    return load_config(TINY_CONFIG, {f"compress.{k}": v for k, v in overrides.items()}).compress


def test_without_candidates_there_is_one_from_compress_quantize():
    cfg = compress_config(quantize={"method": "rtn", "calibration_samples": 3})
    assert [(c.label, c.prune, c.quantize.calibration_samples) for c in cfg.candidates] == [("w4a16-rtn", None, 3)]


def test_candidates_put_their_quantize_keys_on_top_of_compress_quantize():
    cfg = compress_config(quantize={"calibration_samples": 3}, candidates=[{"quantize": {"scheme": "fp8"}}])
    assert (cfg.candidates[0].quantize.scheme, cfg.candidates[0].quantize.calibration_samples) == ("fp8", 3)


def test_prune_true_means_the_compress_prune_section():
    cfg = compress_config(prune=PRUNE, candidates=CANDIDATES)
    assert [c.label for c in cfg.candidates] == ["w4a16-rtn", "nf4", "mlp0.5-depth1_w4a16-rtn"]
    assert cfg.candidates[2].prune == cfg.prune


def test_prune_true_without_a_compress_prune_section_is_an_error():
    with pytest.raises(DistilflowError, match="compress: a candidate has `prune: true` but compress.prune is not set"):
        compress_config(candidates=[{"prune": True}])


def test_two_candidates_with_one_name_are_an_error():
    with pytest.raises(DistilflowError, match=r"candidates share the name\(s\) \['w4a16-gptq'\]"):
        compress_config(candidates=[{}, {"quantize": {"calibration_samples": 2}}])


def test_an_unknown_quantize_key_in_a_candidate_names_it():
    with pytest.raises(DistilflowError, match="compress.candidates.0.quantize.shceme: unknown key"):
        compress_config(candidates=[{"quantize": {"shceme": "fp8"}}])


def test_a_depth_pruning_needs_one_target():
    with pytest.raises(DistilflowError, match="set exactly one of keep_layers or max_params"):
        compress_config(prune={"depth": {"keep_layers": 2, "max_params": 10}})


def test_the_compression_study_reuses_the_demo_up_to_compress():
    demo = load_config(REPO / "configs" / "demo.yaml")
    study = load_config(REPO / "configs" / "compression-study.yaml")
    assert all(getattr(demo, part) == getattr(study, part) for part in ("task", "prototype", "distill", "eval"))
    assert (demo.run.workdir, demo.run.seed, demo.run.device) == (study.run.workdir, study.run.seed, study.run.device)


def test_the_compression_study_tries_every_scheme_with_and_without_depth_pruning():
    study = load_config(REPO / "configs" / "compression-study.yaml").compress
    plain = {c.quantize.label for c in study.candidates if c.prune is None}
    assert plain == {"w4a16-gptq", "w4a16-awq", "fp8", "nf4", "qlr16-gptq"}
    assert {c.quantize.label for c in study.candidates if c.prune and c.prune.depth} == plain


def row(name, size, score, deployable=True, retention=None):
    return compress.Candidate(
        candidate=name, pruning=None, scheme="w4a16-rtn", task_score=score, task_score_ci=[score, score],
        perplexity=10.0, size_bytes=size, params=100, bits_per_param=8 * size / 100, tokens_per_s=1.0, quantize_s=1.0,
        deployable=deployable, note="" if deployable else "reloads broken",
        retention=score if retention is None else retention)


def judged(rows, budget):
    for r in rows:
        r.meets_budget = compress.meets(r.size_bytes, r.retention, budget)
    return rows


def test_the_smallest_candidate_within_budget_is_chosen():
    budget = BudgetConfig(min_retention=0.8)
    rows = judged([row("big", 300, 0.95), row("small-bad", 100, 0.5), row("mid", 200, 0.85)], budget)
    assert compress.choose(rows, budget).candidate == "mid"


def test_a_candidate_that_is_not_deployable_is_never_chosen():
    budget = BudgetConfig()
    rows = judged([row("nf4", 100, 0.9, deployable=False), row("w4a16", 150, 0.9)], budget)
    assert compress.choose(rows, budget).candidate == "w4a16"


def test_the_better_score_breaks_a_size_tie():
    budget = BudgetConfig()
    assert compress.choose(judged([row("a", 100, 0.7), row("b", 100, 0.8)], budget), budget).candidate == "b"


def test_no_candidate_within_budget_is_an_error_that_prints_the_table():
    budget = BudgetConfig(max_size_bytes=150, min_retention=0.9)
    rows = judged([row("big", 300, 0.95), row("small", 100, 0.5)], budget)
    with pytest.raises(DistilflowError, match=r"(?s)max_size_bytes 150, min_retention 0.9.*\| big \|.*\| small \|"):
        compress.choose(rows, budget)


def test_the_pareto_front_holds_the_candidates_nothing_beats_on_size_and_score():
    rows = [row("a", 100, 0.5), row("b", 200, 0.4), row("c", 300, 0.9), row("d", 150, 0.6)]
    assert [r.candidate for r in compress.pareto_front(rows)] == ["a", "d", "c"]


@pytest.fixture(scope="module")
def stage(tmp_path_factory, tiny_prototype, tiny_distill):
    """prototype and distill on the tiny config (the session's), then compress with four candidates, one of them
    pruned, one FP8 (which this CPU cannot run natively)."""
    overrides = {"run.workdir": str(tmp_path_factory.mktemp("work")), "compress.prune": PRUNE,
                 "compress.candidates": [*CANDIDATES, {"quantize": {"scheme": "fp8"}}], "compress.budget": {"max_size_bytes": 10**9}}
    cfg = load_config(TINY_CONFIG, overrides)
    return cfg, {"prototype": tiny_prototype, "distill": tiny_distill,
                 "compress": run_stage("compress", cfg, tiny_prototype, tiny_distill)}


def candidates(stage):
    return json.loads(stage[1]["compress"].candidates.read_text())


def test_every_candidate_is_measured_from_disk_with_the_journey_fields(stage):
    table = candidates(stage)
    assert [r["candidate"] for r in table["candidates"]] == [c.label for c in stage[0].compress.candidates]
    for entry in table["candidates"]:
        assert set(journey.FIELDS) <= entry.keys() and entry["size_bytes"] > 0 and entry["params"] > 0
        assert (stage[1]["compress"].directory / "candidates" / entry["candidate"] / "config.json").is_file()


def test_the_shipped_model_is_the_chosen_candidate_as_compressed_tensors(stage):
    result = stage[1]["compress"]
    chosen = candidates(stage)["chosen"]
    assert result.model.name == chosen == "mlp0.5-depth1_w4a16-rtn"  # the smallest
    config = json.loads((result.model / "config.json").read_text())
    assert config["quantization_config"]["quant_method"] == "compressed-tensors"
    assert (config["num_hidden_layers"], config["intermediate_size"]) == (1, 64)


def test_a_pruned_choice_puts_pruned_then_quantized_in_the_journey(stage):
    result = stage[1]["compress"]
    assert [e.state for e in result.journey] == ["pruned", "quantized"]
    assert result.pruned.params < stage[1]["distill"].last_phase.params
    assert result.pruned_model == result.directory / "pruned" / "mlp0.5-depth1"
    assert result.quantized.candidate == "mlp0.5-depth1_w4a16-rtn" and result.quantized.scheme == "w4a16-rtn"
    assert set(journey.FIELDS) <= result.pruned.as_json().keys() & result.quantized.as_json().keys()


def test_the_summary_tables_every_candidate_and_marks_the_choice(stage):
    summary = stage[1]["compress"].summary
    assert "| **mlp0.5-depth1_w4a16-rtn** (chosen) |" in summary
    assert all(f"| {c.label} |" in summary for c in stage[0].compress.candidates[:2])
    assert "| mlp0.5-depth1 |" in summary  # the pruned model before quantization


def test_the_pareto_chart_and_the_pruning_scores_are_written(stage):
    result = stage[1]["compress"]
    assert result.pareto.stat().st_size > 0
    assert (result.directory / "pruned" / "mlp0.5-depth1-importance.png").stat().st_size > 0
    scores = json.loads((result.directory / "pruned" / "mlp0.5-depth1-importance.json").read_text())
    assert len(scores["kept_layers"]) == 1 and len(scores["mlp"]) == 2


def test_nf4_that_reloads_as_it_ran_in_memory_is_deployable(stage):
    nf4 = next(r for r in candidates(stage)["candidates"] if r["scheme"] == "nf4")
    assert nf4["deployable"] and nf4["note"] == ""


def test_fp8_on_a_cpu_is_produced_and_says_it_was_evaluated_emulated(stage):
    fp8 = next(r for r in candidates(stage)["candidates"] if r["scheme"] == "fp8")
    assert fp8["deployable"] and fp8["note"].startswith("evaluated emulated: cpu has no FP8 kernels")
    assert "| fp8 | – | fp8 |" in stage[1]["compress"].summary and "yes (evaluated emulated" in stage[1]["compress"].summary


def test_a_checkpoint_that_reloads_differently_is_not_deployable():
    in_memory, reloaded = Evaluation({"perplexity": 20.0}), Evaluation({"perplexity": 5e7})
    assert compress.reload_verdict(in_memory, reloaded) == (
        False, "the saved checkpoint reloads broken (perplexity 5e+07, in memory 20)")


def test_a_checkpoint_that_reloads_as_it_ran_is_deployable():
    assert compress.reload_verdict(Evaluation({"perplexity": 20.0}), Evaluation({"perplexity": 20.001})) == (True, "")
