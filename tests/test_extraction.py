"""End to end on the tiny models: a JSON extraction task (configs/extract.yaml's check) through every stage,
answered, trained with SFT then GRPO, quantized and served under its schema."""

import json
from pathlib import Path

import pytest

from distilflow.configs.loader import load_config
from tests.conftest import REPO, write_config

TINY_EXTRACT = """
run: {name: tiny-extract, workdir: work, seed: 0, device: cpu}
task:
  data: @REPO@/configs/data/ticket_fields.jsonl
  eval_size: 4
  few_shot_pool: 4
  max_train: 8
  system_prompt: Answer with the ticket's fields as JSON.
  template: "Ticket: {text}"
  max_answer_tokens: 32
  check: {type: json_schema, json_schema: SCHEMA}
prototype:
  teacher: {path: @REPO@/tests/assets/tiny-teacher}
  few_shot: 1
  min_score: 0.0
  train_on_pool: true   # the random teacher's answers seldom validate: the pool's gold objects give SFT rows
distill:
  phases: [sft, grpo]
  student: {teacher_layers: 2}
  lora: {r: 4, lora_alpha: 8}
  sft: {max_steps: 2, per_device_train_batch_size: 4, max_length: 256}
  grpo: {max_steps: 1, per_device_train_batch_size: 2, num_generations: 2, max_completion_length: 32}
compress:
  quantize: {method: rtn}
deploy:
  smoke_prompts: 2
  max_new_tokens: 256   # the random student fills strings at length: room to close the object
  gguf: q8_0
  gate: {max_regression: null, max_engine_gap: null}
eval:
  perplexity_examples: 2
  speed_new_tokens: 2
  serving: {concurrency: 1, decode_tokens: 4, speed_repeats: 1, latency_requests: 1, skip_states: [teacher]}
"""


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    from prefect.testing.utilities import prefect_test_harness

    from distilflow.flows.pipeline import pipeline

    schema = load_config(REPO / "configs" / "extract.yaml").task.check.json_schema
    config = write_config(tmp_path_factory.mktemp("extract"), TINY_EXTRACT.replace("SCHEMA", json.dumps(schema)))
    with prefect_test_harness(server_startup_timeout=120):
        return pipeline(str(config), {}), schema


def test_a_json_task_runs_every_stage_with_sft_then_grpo_and_no_baseline(run):
    record, _ = run
    assert [(e["state"], e.get("phase")) for e in record["journey"]] == [
        ("teacher", None), ("student", "sft"), ("student", "grpo"), ("quantized", None), ("deployed", None)]


def test_the_bundle_asks_either_engine_for_the_tasks_schema(run):
    record, schema = run
    bundle = Path(record["bundle"])
    assert json.loads((bundle / "request.json").read_text())["structured_outputs"] == {"json": schema}
    assert json.loads((bundle / "gguf" / "request.json").read_text())["json_schema"] == schema


def test_the_gguf_answers_the_smoke_prompts_under_the_schema(run):
    record, _ = run
    assert next(e for e in record["journey"] if e["state"] == "deployed")["gguf_smoke_pass_rate"] == 1.0


def test_the_data_card_says_the_tfidf_baseline_does_not_apply(run):
    record, _ = run
    card = next(Path(record["bundle"]).parents[3].glob("artifacts/prototype/*/data_card.md")).read_text()
    assert "## Baseline\n\nNot applicable" in card
