"""The prototype stage: rejection sampling, the judge filter, the data card, and a black-box teacher
served over HTTP, from one stage up to the whole pipeline."""

import io
import json
import logging
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager, redirect_stderr, redirect_stdout
from dataclasses import dataclass
from pathlib import Path

import pytest
from datasets import load_from_disk
from mlflow import MlflowClient

from distilflow.configs.loader import load_config
from distilflow.configs.schema import JudgeConfig, PythonCheck
from distilflow.tasks import data, journey, text_features
from distilflow.tasks.data import TaskData, load_task_data
from distilflow.tasks.errors import DistilflowError
from distilflow.tasks.evaluate import Prompting
from distilflow.tasks.judge import SCORES, judge_filter, judge_scores, parse_score, require_discerning_judge
from distilflow.tasks.prototype import data_card, most_confident_per_label, rejection_sample
from distilflow.tasks.stages import run_stage
from distilflow.tasks.teachers import LocalTeacher
from tests.conftest import REPO, TINY_CONFIG, TINY_TEACHER, free_port

KEY_ENV = "DISTILFLOW_TEST_TEACHER_KEY"
# The tiny config, smaller still: these tests check what is produced, not how well.
SMALL = {"task.max_train": 12, "task.eval_size": 8, "compress.quantize.method": "rtn", "deploy.smoke_prompts": 2,
         "eval.perplexity_examples": 4, "eval.speed_new_tokens": 2}


def test_rejection_sampling_keeps_partial_credit_down_to_min_score(tiny_cfg, tmp_path):
    (tmp_path / "half.py").write_text("def half(answer, row):\n    return 0.5 if answer == 'meh' else 1.0\n")
    check = PythonCheck.model_validate({"type": "python", "function": "half.py:half"},
                                       context={"base_dir": tmp_path})
    task = tiny_cfg.task.model_copy(update={"check": check})
    rows, answers = [{"text": "a"}], [["meh", "good"]]
    kept, rejected = rejection_sample(rows, answers, task, min_score=0.5)
    assert [k["answer"] for k in kept] == ["meh", "good"] and not rejected
    kept, rejected = rejection_sample(rows, answers, task, min_score=1.0)
    assert [k["answer"] for k in kept] == ["good"] and rejected == Counter(low_score=1)


def test_kept_answers_carry_score_and_provenance(tiny_cfg):
    kept, _ = rejection_sample([{"text": "a", "label": "bug"}], [["payment", "bug"]], tiny_cfg.task)
    assert kept == [{"row": {"text": "a", "label": "bug"}, "answer": "bug", "score": 1.0, "input_index": 0,
                     "sample": 1, "confidence": None, "agreement": None, "choice_probs": None}]


def test_self_consistency_keeps_the_majority_answer_of_inputs_whose_samples_agree(tiny_cfg):
    rows = [{"text": "a"}, {"text": "b"}, {"text": "c"}]
    answers = [["bug", "bug", "bug", "payment"], ["bug", "payment", "account", "delivery"], ["bug", "x", "bug", "x"]]
    kept, rejected = rejection_sample(rows, answers, tiny_cfg.task, min_agreement=0.75)
    assert [(k["row"]["text"], k["answer"], k["agreement"]) for k in kept] == [("a", "bug", 0.75)]
    # c: 2 of 4 agree (invalid answers count against agreement)
    assert rejected == Counter(outvoted=1, duplicate=2, low_agreement=4 + 2, invalid=2)
    assert sum(rejected.values()) + len(kept) == 12


def test_json_answers_vote_as_json_and_are_kept_as_labels_are_written():
    task = load_config(REPO / "configs" / "extract.yaml").task
    same = ['{"queue": "bug", "order_id": null, "amount": null, "currency": null, "product": null}',
            '{"queue":"bug","order_id":null,"amount":null,"currency":null,"product":null}',
            '```json\n{"queue": "bug", "order_id": null, "amount": null, "currency": null, "product": null}\n```']
    other = '{"queue": "account", "order_id": null, "amount": null, "currency": null, "product": null}'
    kept, rejected = rejection_sample([{"text": "a"}], [[*same, other]], task, min_score=0.0, min_agreement=0.75)
    assert [(k["answer"], k["agreement"]) for k in kept] == [(same[0], 0.75)]
    assert rejected == Counter(outvoted=1, duplicate=2)


def test_a_json_task_whose_teacher_answers_do_not_parse_stops_and_counts_them(tmp_path):
    extract = load_config(REPO / "configs" / "extract.yaml").task
    # 8 tokens hold no whole object: every answer of the (random) teacher fails to parse.
    cfg = load_config(TINY_CONFIG, {"run.workdir": str(tmp_path), **SMALL, "task.data": str(extract.data),
                                    "task.check": extract.check.model_dump(), "task.max_answer_tokens": 8,
                                    "prototype.num_samples": 1, "prototype.temperature": 0.0})
    with pytest.raises(DistilflowError, match=r"no teacher answer was kept \(invalid: 12 of 12\)"):
        run_stage("prototype", cfg)


def test_teacher_confidence_drops_answers_it_gave_a_low_probability(tiny_cfg):
    rows = [{"text": "a"}, {"text": "b"}]
    distributions = [{"bug": 0.9, "payment": 0.1}, {"bug": 0.4, "payment": 0.6}]
    kept, rejected = rejection_sample(rows, [["bug"], ["payment"]], tiny_cfg.task, min_confidence=0.7,
                                      distributions=distributions)
    assert [(k["answer"], k["confidence"], k["choice_probs"]) for k in kept] == [("bug", 0.9, distributions[0])]
    assert rejected == Counter(low_confidence=1)


def test_confidence_per_label_keeps_each_labels_most_confident_answers(tiny_cfg):
    kept = [{"answer": answer, "confidence": confidence} for answer, confidence in
            [("payment", 0.9), ("payment", 0.8), ("payment", 0.7), ("payment", 0.6), ("bug", 0.4), ("bug", 0.3)]]
    chosen, rejected = most_confident_per_label(kept, 0.5)
    # a teacher surer of payment than of bug still leaves the student half of its bug answers
    assert [(k["answer"], k["confidence"]) for k in chosen] == [("payment", 0.9), ("payment", 0.8), ("bug", 0.4)]
    assert rejected == Counter(less_confident=3)


def test_the_teacher_alone_labels_the_distillation_set_with_its_probabilities(tmp_path):
    cfg = load_config(TINY_CONFIG, {"run.workdir": str(tmp_path), **SMALL, "prototype.num_samples": 1,
                                    "prototype.temperature": 0.0, "prototype.min_confidence": 0.25})
    result = run_stage("prototype", cfg)
    rows = [json.loads(line) for line in result.dataset_jsonl.read_text().splitlines()]
    assert len(rows) == 12 and {row["label_source"] for row in rows} == {"teacher"}
    assert all(not row["label"] for row in rows)
    # greedy: the answer is the most probable of the four queues, so at least 1/4
    assert all(row["confidence"] == max(row["choice_probs"].values()) >= 0.25 for row in rows)
    assert all(sum(row["choice_probs"].values()) == pytest.approx(1.0) for row in rows)


def test_the_labelled_pool_joins_the_distillation_set_as_gold_when_asked(tmp_path):
    cfg = load_config(TINY_CONFIG, {"run.workdir": str(tmp_path), **SMALL, "prototype.num_samples": 1,
                                    "prototype.temperature": 0.0, "prototype.train_on_pool": True})
    result = run_stage("prototype", cfg)
    rows = [json.loads(line) for line in result.dataset_jsonl.read_text().splitlines()]
    gold = [row for row in rows if row["label_source"] == "gold"]
    assert len(gold) == cfg.task.few_shot_pool and all(row["answer"] == row["label"] for row in gold)
    assert Counter(row["label_source"] for row in rows) == {"teacher": 12, "gold": cfg.task.few_shot_pool}
    assert all(row["choice_probs"][row["label"]] == 1.0 for row in gold)
    held_out = {row["text"] for row in load_task_data(cfg.task, cfg.run.seed).eval}
    assert not held_out & {row["prompt"][-1]["content"].removeprefix("Ticket: ") for row in rows}


def test_a_time_budget_labels_the_inputs_it_has_time_for_and_the_card_says_so(tmp_path):
    cfg = load_config(TINY_CONFIG, {"run.workdir": str(tmp_path), **SMALL, "task.max_train": 150,
                                    "prototype.num_samples": 1, "prototype.temperature": 0.0,
                                    "prototype.time_budget_s": 1e-6})
    result = run_stage("prototype", cfg)
    assert result.metrics["kept"] + result.metrics["rejected"] == 64  # one chunk: the budget is spent after it
    assert "150 were there, prototype.time_budget_s let it label these" in result.data_card.read_text()


def test_no_held_out_input_reaches_the_teachers_prompts_or_the_distillation_set(tmp_path):
    rows = [json.loads(line) for line in (TINY_CONFIG.parent / "data" / "support_tickets.jsonl").read_text()
            .splitlines()][:200]
    tripled = tmp_path / "tripled.jsonl"
    tripled.write_text("".join(json.dumps(row) + "\n" for row in rows for _ in range(3)))
    cfg = load_config(TINY_CONFIG, {"run.workdir": str(tmp_path / "work"), **SMALL, "task.data": str(tripled),
                                    "task.max_train": None, "prototype.num_samples": 1,
                                    "prototype.shot_candidates": 2, "prototype.shot_dev_size": 4})
    result = run_stage("prototype", cfg)
    held_out = {" ".join(p["prompt"].split("Ticket: ")[-1].split("<|im_end|>")[0].split()).casefold()
                for p in json.loads(result.teacher_eval.read_text())["predictions"]}
    trained = [json.loads(line)["prompt"][-1]["content"]
               for line in result.dataset_jsonl.read_text().splitlines()]
    shots = [shot["text"] for shot in result.few_shot]
    assert len(held_out) == 8 and result.metrics["data.duplicates_removed"] == 400
    assert not held_out & {" ".join(text.removeprefix("Ticket: ").split()).casefold() for text in trained + shots}
    assert "400 rows dropped before the split as duplicate inputs" in result.summary


@pytest.mark.parametrize("reply, score", [("4", 4), ("Score: 3/5", 3), ("I give it a 5.", 5), ("10", None),
                                          ("excellent", None)])
def test_judge_reply_is_read_for_its_first_digit_1_to_5(reply, score):
    assert parse_score(reply) == score


def test_judge_filter_drops_low_and_unreadable_scores():
    kept = [{"answer": a} for a in "abcd"]
    passed, rejected = judge_filter(kept, [5, 3, None, 4], threshold=4)
    assert [(p["answer"], p["judge_score"]) for p in passed] == [("a", 5), ("d", 4)]
    assert rejected == Counter(judge_low_score=1, judge_unparsed=1)


def right_answers(count: int) -> list[dict]:
    """Kept answers that match their data labels."""
    return [{"row": {"text": f"ticket {i}", "label": "bug"}, "answer": "bug", "score": 1.0} for i in range(count)]


def test_a_judge_that_rejects_the_answers_matching_their_labels_is_an_error(tiny_cfg):
    with pytest.raises(DistilflowError, match=r"prototype.judge: the judge rejected 9 of the 10 kept answers that "
                                              r"match their labels .* would leave 1 of 10 answers. Use a stronger "
                                              r"judge than the teacher \(prototype.judge.teacher\)"):
        require_discerning_judge(right_answers(10), [1] * 8 + [None, 5], tiny_cfg.task, threshold=4)


def test_a_judge_that_keeps_most_right_answers_passes(tiny_cfg):
    require_discerning_judge(right_answers(10), [1] * 5 + [5] * 5, tiny_cfg.task, threshold=4)


def test_a_judge_that_rejects_nearly_every_unlabelled_answer_is_a_warning(tiny_cfg, caplog):
    unlabelled = [{"row": {"text": f"ticket {i}"}, "answer": "bug", "score": 1.0} for i in range(10)]
    require_discerning_judge(unlabelled, [1] * 10, tiny_cfg.task, threshold=4)
    assert "prototype.judge rejected 10 of 10 kept answers" in caplog.text


def test_local_judge_scores_every_answer_by_constrained_choice(tiny_cfg, tiny_teacher):
    judge = LocalTeacher(*tiny_teacher, name="tiny")
    kept = [{"row": {"text": "my card was charged twice"}, "answer": answer} for answer in ("payment", "bug")]
    scores = judge_scores(judge, kept, tiny_cfg.task, JudgeConfig(rubric="The queue fits the ticket."))
    assert len(scores) == 2 and all(str(s) in SCORES.choices for s in scores)


def test_data_card_counts_rejections_labels_and_answer_lengths(tiny_cfg):
    teacher = LocalTeacher(None, None, name="tiny")
    kept = [{"row": {}, "answer": "bug", "confidence": None}, {"row": {}, "answer": "bug", "confidence": None},
            {"row": {}, "answer": "payment", "confidence": None}]
    examples = TaskData(train=[{"text": "a", "label": "bug"}, {"text": "b"}], eval=[], duplicates=2)
    card = data_card(kept, Counter(wrong_label=1), examples, examples.train, tiny_cfg.prototype, tiny_cfg.task,
                     teacher)
    assert "1 labelled, 1 labelled by the teacher" in card and "2 rows dropped before the split" in card
    assert "**Kept 3** (label source: teacher 3), rejected 1" in card
    assert "| wrong_label | prototype.min_score: scored against the data's label | 1 |" in card
    assert "| bug | 2 |" in card and "| payment | 1 |" in card
    assert "min 3, median 3, mean 4.3, max 7" in card


def test_judge_scores_travel_with_the_kept_answers(tmp_path):
    cfg = load_config(TINY_CONFIG, {"run.workdir": str(tmp_path), **SMALL, "prototype.num_samples": 1,
                                    "prototype.judge": {"rubric": "The queue fits the ticket.", "threshold": 1}})
    result = run_stage("prototype", cfg)
    dataset = load_from_disk(result.dataset)
    assert len(dataset) + result.metrics["rejected"] == 12
    assert all(score in range(1, 6) for score in dataset["judge_score"])
    assert "Judge (`teacher`)" in result.summary


def test_no_kept_answer_fails_the_stage_with_the_counts(tmp_path):
    (tmp_path / "never.py").write_text("def never(answer, row):\n    return 0.0\n")
    cfg = load_config(TINY_CONFIG, {"run.workdir": str(tmp_path / "work"), **SMALL, "prototype.num_samples": 1,
                                    "task.max_answer_tokens": 4,
                                    "task.check": {"type": "python", "function": f"{tmp_path / 'never.py'}:never"}})
    with pytest.raises(DistilflowError, match="no teacher answer was kept \\(low_score: 12 of 12\\)"):
        run_stage("prototype", cfg)
    assert [p.name for p in (tmp_path / "work" / "artifacts" / "prototype").iterdir()
            if not p.name.endswith(".lock")] == []


def http_teacher(openai_server) -> dict:
    return {"base_url": openai_server.base_url, "model": openai_server.model, "api_key_env": KEY_ENV}


@pytest.fixture(scope="module")
def black_box(openai_server, tmp_path_factory):
    """The prototype stage, alone, with the HTTP teacher (which also judges)."""
    workdir = tmp_path_factory.mktemp("black-box")
    with pytest.MonkeyPatch.context() as env:
        env.setenv(KEY_ENV, openai_server.api_key)
        cfg = load_config(TINY_CONFIG, {"run.workdir": str(workdir), **SMALL,
                                        "prototype.teacher": http_teacher(openai_server),
                                        "distill.student": {"path": str(TINY_TEACHER)},
                                        "prototype.judge": {"rubric": "The queue fits the ticket.", "threshold": 1}})
        return run_stage("prototype", cfg), workdir


def test_black_box_stage_writes_dataset_card_and_baseline(black_box):
    result, _ = black_box
    dataset = load_from_disk(result.dataset)
    assert len(dataset) == result.metrics["kept"] > 0
    assert {"prompt", "completion", "answer", "score", "judge_score", "teacher"} <= set(dataset.column_names)
    assert json.loads(result.teacher_eval.read_text())["metrics"]["task_score"] >= 0
    assert "## Data card" in result.data_card.read_text() and "## Teacher's score" in result.summary


def test_black_box_stage_says_it_has_no_teacher_weights(black_box):
    result, _ = black_box
    assert result.teacher is None and result.endpoint is not None and result.metrics["teacher.black_box"] == 1.0
    assert "black-box" in result.summary and "no student pruned from it" in result.summary
    assert "Labels chosen by the server's guided choice" in result.summary
    entry = result.teacher_row.as_json()
    assert set(journey.FIELDS) <= entry.keys() and entry["size_bytes"] is None and entry["task_score"] >= 0


def test_api_key_is_written_nowhere(black_box, openai_server):
    result, workdir = black_box
    for path in Path(workdir).rglob("*"):
        if path.is_file():
            assert openai_server.api_key.encode() not in path.read_bytes(), path


@dataclass
class Traces:
    """Everywhere a pipeline run leaves words: its logs, and what the Prefect server recorded of it."""

    logs: list[str]
    flow_run_parameters: list[dict]
    prefect_logs: list[str]
    prefect_artifacts: list[str]


class Recorder(logging.Handler):
    def __init__(self):
        super().__init__(level=logging.DEBUG)
        self.lines = []

    def emit(self, record):
        self.lines.append(self.format(record))


@contextmanager
def recorded_logs() -> Iterator[list[str]]:
    """Every log record the run emits (distilflow's included), and everything it prints (progress bars)."""
    recorder, printed = Recorder(), io.StringIO()
    logging.getLogger().addHandler(recorder)
    try:
        with redirect_stdout(printed), redirect_stderr(printed):
            yield recorder.lines
    finally:
        logging.getLogger().removeHandler(recorder)
        recorder.lines.append(printed.getvalue())


def prefect_traces() -> tuple[list[dict], list[str], list[str]]:
    """Flow-run parameters, logs and artifacts the (test) Prefect server holds."""
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        return ([run.parameters for run in client.read_flow_runs()],
                [log.message for log in client.read_logs()],
                [json.dumps(artifact.data, default=str) for artifact in client.read_artifacts()])


@pytest.fixture(scope="module")
def pipeline_runs(openai_server, tmp_path_factory):
    """The whole pipeline with the HTTP teacher (its API key in the environment), then with an endpoint
    nobody serves; with every trace the runs left."""
    from prefect.testing.utilities import prefect_test_harness

    from distilflow.flows.pipeline import pipeline

    workdir = tmp_path_factory.mktemp("http-pipeline")
    overrides = {"run.workdir": str(workdir), "prototype.teacher": http_teacher(openai_server),
                 "distill.student": {"path": str(TINY_TEACHER)}, **SMALL}
    unreachable = {**overrides, "run.workdir": str(workdir / "unreachable"),
                   "prototype.teacher": {**http_teacher(openai_server), "max_retries": 0,
                                         "base_url": f"http://127.0.0.1:{free_port()}/v1"}}
    # distilflow's INFO records (on once any test ran the CLI's main()) all go to the harness's API, and after
    # the failed run its shutdown drains them for minutes: keep the level a test session starts with.
    distilflow_log, level = logging.getLogger("distilflow"), logging.getLogger("distilflow").level
    distilflow_log.setLevel(logging.WARNING)
    try:
        with pytest.MonkeyPatch.context() as env, prefect_test_harness(server_startup_timeout=120):
            env.setenv(KEY_ENV, openai_server.api_key)
            with recorded_logs() as logs:
                record = pipeline(str(TINY_CONFIG), overrides)
                with pytest.raises(DistilflowError) as failure:
                    pipeline(str(TINY_CONFIG), unreachable)
            traces = Traces(logs, *prefect_traces())
    finally:
        distilflow_log.setLevel(level)
    return record, failure.value, workdir, traces


def test_pipeline_with_http_teacher_runs_to_the_bundle(pipeline_runs):
    record, *_ = pipeline_runs
    journey = {e["state"]: e for e in record["journey"]}
    assert list(journey) == ["teacher", "baseline", "student", "quantized", "deployed"]
    assert journey["teacher"]["size_bytes"] is None and journey["teacher"]["task_score"] >= 0
    assert (Path(record["bundle"]) / "README.md").is_file()


def test_pipeline_logs_the_black_box_teacher_to_mlflow_without_its_key(pipeline_runs, openai_server):
    record, *_ = pipeline_runs
    client = MlflowClient(record["mlflow_tracking_uri"])
    parent = client.get_run(record["mlflow_run_id"])
    assert parent.data.params["prototype.teacher.api_key_env"] == KEY_ENV
    assert all(openai_server.api_key not in value for value in parent.data.params.values())
    children = client.search_runs([parent.info.experiment_id],
                                  filter_string=f"tags.mlflow.parentRunId = '{parent.info.run_id}'")
    prototype = next(run for run in children if run.data.tags["distilflow.stage"] == "prototype")
    assert prototype.data.tags["distilflow.teacher_access"] == "black-box"
    assert prototype.data.metrics["teacher.black_box"] == 1.0


def test_unreachable_endpoint_fails_the_run_and_publishes_nothing(pipeline_runs):
    _, failure, workdir, _ = pipeline_runs
    assert "cannot reach" in str(failure) and "is the server running" in str(failure)
    published = workdir / "unreachable" / "artifacts" / "prototype"
    assert not published.exists() or [p.name for p in published.iterdir() if not p.name.endswith(".lock")] == []


# --- the API key is written nowhere -----------------------------------------------------------------------

def mlflow_runs(record) -> list:
    client = MlflowClient(record["mlflow_tracking_uri"])
    parent = client.get_run(record["mlflow_run_id"])
    return client.search_runs([parent.info.experiment_id])  # the parent, each stage's and each phase's


def test_api_key_is_in_no_mlflow_param_tag_or_metric_name(pipeline_runs, openai_server):
    record, *_ = pipeline_runs
    runs = mlflow_runs(record)
    assert len(runs) > 4
    for run in runs:
        words = [*run.data.params.items(), *run.data.tags.items(), *run.data.metrics]
        assert openai_server.api_key not in json.dumps(words), run.info.run_name


def test_api_key_is_in_no_mlflow_artifact(pipeline_runs, openai_server):
    _, _, workdir, _ = pipeline_runs
    artifacts = [path for path in (workdir / "mlartifacts").rglob("*") if path.is_file()]
    assert any(path.name == "journey.json" for path in artifacts)
    assert [path for path in artifacts if openai_server.api_key.encode() in path.read_bytes()] == []


def test_api_key_is_in_no_prefect_flow_run_parameter_log_or_artifact(pipeline_runs, openai_server):
    *_, traces = pipeline_runs
    assert any("overrides" in parameters for parameters in traces.flow_run_parameters) and traces.prefect_logs
    assert openai_server.api_key not in json.dumps(traces.flow_run_parameters, default=str)
    assert not [line for line in traces.prefect_logs + traces.prefect_artifacts if openai_server.api_key in line]


def test_api_key_is_in_no_log_line_or_printed_output(pipeline_runs, openai_server):
    *_, traces = pipeline_runs
    assert any("prototype" in line for line in traces.logs)
    assert not [line for line in traces.logs if openai_server.api_key in line]


def test_api_key_is_in_no_file_of_the_workdir_the_bundle_or_the_run_history(pipeline_runs, openai_server):
    import os

    record, _, workdir, _ = pipeline_runs
    bundle = Path(record["bundle"])
    assert bundle.is_relative_to(workdir) and (bundle / "README.md").is_file()  # the model card
    written = [p for root in (workdir, Path(os.environ["DISTILFLOW_HOME"])) for p in root.rglob("*") if p.is_file()]
    assert [path for path in written if openai_server.api_key.encode() in path.read_bytes()] == []


def test_knn_demonstrations_score_each_input_as_a_prompt_with_its_own_nearest_examples_would(tiny_cfg, tiny_teacher):
    model, tokenizer = tiny_teacher
    task, examples = tiny_cfg.task, load_task_data(tiny_cfg.task, tiny_cfg.run.seed)
    rows = examples.train[:3]
    knn = Prompting(tuple(examples.pool[:2]), calibrate=True, nearest_of=tuple(examples.pool))
    scores = knn.choice_scores(model, tokenizer, rows, task)
    for row, shots, row_scores in zip(rows, text_features.nearest(examples.pool, rows, 2, task), scores):
        alone = Prompting(shots, calibrate=True).choice_scores(model, tokenizer, [row], task)[0]
        assert row_scores == pytest.approx(alone, abs=1e-4)  # calibrated on content-free inputs with the same shots


def test_prototype_with_knn_demonstrations_shows_each_input_its_most_similar_pool_examples(tmp_path):
    cfg = load_config(TINY_CONFIG, {"run.workdir": str(tmp_path), **SMALL, "prototype.num_samples": 1,
                                    "prototype.temperature": 0.0, "prototype.demonstrations": "knn"})
    result = run_stage("prototype", cfg)
    rows = [json.loads(line) for line in result.dataset_jsonl.read_text().splitlines()]
    examples = load_task_data(cfg.task, cfg.run.seed)
    nearest = text_features.nearest(examples.pool, examples.train, cfg.prototype.few_shot, cfg.task)
    for row in rows:
        shown = [turn["content"] for turn in row["teacher_prompt"][1:-1:2]]
        assert shown == [data.user_message(shot, cfg.task) for shot in nearest[row["input_index"]]]
    assert len({json.dumps(row["teacher_prompt"][1:-1]) for row in rows}) > 1  # not one fixed set
    assert "each input's 2 most similar examples of the labelled pool" in result.data_card.read_text()
