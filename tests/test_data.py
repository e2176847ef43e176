"""Task data: a seeded split every stage shares, few-shot examples, prompts, and bad data caught early."""

import json

import pytest

from distilflow.tasks import data
from distilflow.tasks.errors import DistilflowError


def write_rows(tmp_path, rows, name="data.jsonl"):
    path = tmp_path / name
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def with_data(cfg, path):
    return cfg.task.model_copy(update={"data": path})


def test_split_is_deterministic_and_held_out_is_labelled(tiny_cfg):
    first = data.load_task_data(tiny_cfg.task, seed=0)
    second = data.load_task_data(tiny_cfg.task, seed=0)
    assert first == second
    assert len(first.eval) == tiny_cfg.task.eval_size
    assert all(data.label(r, tiny_cfg.task) for r in first.eval)
    assert not {r["id"] for r in first.eval} & {r["id"] for r in first.train}


def test_another_seed_gives_another_split(tiny_cfg):
    assert data.load_task_data(tiny_cfg.task, 0).eval != data.load_task_data(tiny_cfg.task, 1).eval


def test_unlabelled_rows_join_the_training_pool(tiny_cfg, tmp_path):
    rows = [{"text": f"ticket {i}", "label": "bug"} for i in range(20)] + [{"text": "no label"}]
    task = with_data(tiny_cfg, write_rows(tmp_path, rows)).model_copy(update={"eval_size": 5, "max_train": None})
    split = data.load_task_data(task, 0)
    assert {"text": "no label"} in split.train and {"text": "no label"} not in split.eval


def inputs(rows, task) -> set[str]:
    return {data.normalized_input(row, task) for row in rows}


def test_duplicated_rows_never_put_a_held_out_input_into_training_or_the_few_shot_pool(tiny_cfg, tmp_path):
    rows = [json.loads(line) for line in tiny_cfg.task.data.read_text().splitlines()][:300]
    tripled = write_rows(tmp_path, [row for row in rows for _ in range(3)])  # each input 3 times, in a row
    for pool in (None, 8):
        task = with_data(tiny_cfg, tripled).model_copy(update={"few_shot_pool": pool, "max_train": None})
        split = data.load_task_data(task, 0)
        set_aside = len(split.pool) if pool else 0  # unset: the pool is the labelled training inputs
        assert split.duplicates == 600 and len(split.train) + len(split.eval) + set_aside == 300
        assert not inputs(split.eval, task) & (inputs(split.train, task) | inputs(split.pool, task))


def test_inputs_that_differ_only_in_case_and_spacing_are_duplicates(tiny_cfg, tmp_path):
    rows = [{"text": f"ticket {i}", "label": "bug"} for i in range(12)] + \
        [{"text": "  TICKET   3 ", "label": "bug"}, {"text": "Ticket 3\n"}]
    split = data.load_task_data(with_data(tiny_cfg, write_rows(tmp_path, rows)).model_copy(
        update={"eval_size": 4, "few_shot_pool": None}), 0)
    assert split.duplicates == 2 and len(split.train) + len(split.eval) == 12


def test_the_few_shot_pool_is_set_aside_from_the_training_inputs(tiny_cfg):
    split = data.load_task_data(tiny_cfg.task, 0)
    assert len(split.pool) == tiny_cfg.task.few_shot_pool and all(data.label(r, tiny_cfg.task) for r in split.pool)
    assert not inputs(split.pool, tiny_cfg.task) & inputs(split.train, tiny_cfg.task)


def test_without_a_set_aside_pool_the_labelled_training_inputs_are_the_pool(tiny_cfg, tmp_path):
    rows = [{"text": f"ticket {i}", "label": "bug"} for i in range(10)] + [{"text": "no label"}]
    task = with_data(tiny_cfg, write_rows(tmp_path, rows)).model_copy(update={"eval_size": 4, "few_shot_pool": None})
    split = data.load_task_data(task, 0)
    assert split.pool == [r for r in split.train if "label" in r] and len(split.pool) == 6


def test_a_pool_too_small_for_the_few_shot_settings_names_the_keys(tiny_cfg):
    split = data.load_task_data(tiny_cfg.task, 0)  # a pool of 8
    data.check_few_shot_pool(split, tiny_cfg.task, tiny_cfg.prototype.model_copy(update={"few_shot": 8}))
    for settings, needed in (({"few_shot": 9}, 9), ({"few_shot": 4, "shot_candidates": 2, "shot_dev_size": 5}, 9)):
        with pytest.raises(DistilflowError, match=rf"few-shot pool has 8 examples \(task.few_shot_pool is 8.*"
                                                  rf"prototype.few_shot.* needs {needed}"):
            data.check_few_shot_pool(split, tiny_cfg.task, tiny_cfg.prototype.model_copy(update=settings))


def test_a_pool_too_small_is_caught_by_validate_before_any_stage(tiny_cfg, tmp_path):
    from distilflow.configs.loader import load_config
    from distilflow.tasks.stages import preflight
    from tests.conftest import TINY_CONFIG

    cfg = load_config(TINY_CONFIG, {"run.workdir": str(tmp_path / "work"), "task.few_shot_pool": 1})
    with pytest.raises(DistilflowError, match="task.few_shot_pool is 1.*prototype.few_shot \\(2\\)"):
        preflight(cfg, f"sqlite:///{tmp_path / 'mlflow.db'}")
    assert not (tmp_path / "work").exists()


def test_few_shot_examples_show_every_label(tiny_cfg):
    split = data.load_task_data(tiny_cfg.task, 0)
    shots = data.few_shot_examples(split.pool, tiny_cfg.task, k=4, seed=0)
    assert sorted(s["label"] for s in shots) == sorted(tiny_cfg.task.check.choices)


def test_messages_put_shots_before_the_input(tiny_cfg):
    row, shot = {"text": "my parcel is late"}, {"text": "refund me", "label": "payment"}
    chat = data.messages(row, tiny_cfg.task, [shot])
    assert [m["role"] for m in chat] == ["system", "user", "assistant", "user"]
    assert chat[2]["content"] == "payment" and chat[-1]["content"] == "Ticket: my parcel is late"


def test_content_free_rows_fill_every_template_field(tiny_cfg):
    rows = data.content_free_rows(tiny_cfg.task)
    assert [r["text"] for r in rows] == list(data.CONTENT_FREE_TEXTS)


def test_empty_data_file_is_an_error(tiny_cfg, tmp_path):
    path = tmp_path / "empty.jsonl"
    path.write_text("\n")
    with pytest.raises(DistilflowError, match="empty"):
        data.load_task_data(with_data(tiny_cfg, path), 0)


def test_bad_json_line_is_named(tiny_cfg, tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"text": "a", "label": "bug"}\n{"text": oops}\n')
    with pytest.raises(DistilflowError, match=r"bad.jsonl:2: not valid JSON"):
        data.load_task_data(with_data(tiny_cfg, path), 0)


def test_missing_field_is_named(tiny_cfg, tmp_path):
    path = write_rows(tmp_path, [{"body": "x", "label": "bug"}])
    with pytest.raises(DistilflowError, match="example 1 has no field text"):
        data.load_task_data(with_data(tiny_cfg, path), 0)


def test_label_outside_choices_is_named(tiny_cfg, tmp_path):
    path = write_rows(tmp_path, [{"text": "x", "label": "bug"}, {"text": "y", "label": "refunds"}])
    with pytest.raises(DistilflowError, match="example 2 has label 'refunds'"):
        data.load_task_data(with_data(tiny_cfg, path), 0)


def test_too_few_labelled_examples_for_the_held_out_split(tiny_cfg, tmp_path):
    path = write_rows(tmp_path, [{"text": f"t{i}", "label": "bug"} for i in range(10)])
    with pytest.raises(DistilflowError, match="task.eval_size is 16"):
        data.load_task_data(with_data(tiny_cfg, path), 0)


TICKETS = [{"text": f"ticket {i}", "label": ["payment", "delivery", "bug", "account"][i % 4]} for i in range(24)]


def test_csv_parquet_json_and_saved_datasets_read_the_same_rows(tmp_path):
    import csv

    import pyarrow as pa
    import pyarrow.parquet as pq
    from datasets import Dataset

    with open(tmp_path / "t.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["text", "label"])
        writer.writeheader()
        writer.writerows(TICKETS)
    pq.write_table(pa.Table.from_pylist(TICKETS), tmp_path / "t.parquet")
    (tmp_path / "t.json").write_text(json.dumps(TICKETS))
    Dataset.from_list(TICKETS).save_to_disk(tmp_path / "saved")
    for name in ("t.csv", "t.parquet", "t.json", "saved"):
        assert data.read_rows(tmp_path / name) == TICKETS, name


def test_dataset_dict_split_is_chosen_by_data_split(tmp_path):
    from datasets import Dataset, DatasetDict

    DatasetDict({"train": Dataset.from_list(TICKETS), "test": Dataset.from_list(TICKETS[:2])}).save_to_disk(
        tmp_path / "splits")
    assert data.read_rows(tmp_path / "splits", "test") == TICKETS[:2]


def test_dataset_dict_without_data_split_names_the_splits(tmp_path):
    from datasets import Dataset, DatasetDict

    DatasetDict({"train": Dataset.from_list(TICKETS), "test": Dataset.from_list(TICKETS)}).save_to_disk(
        tmp_path / "splits")
    with pytest.raises(DistilflowError, match=r"holds splits \['train', 'test'\]; set task.data_split"):
        data.read_rows(tmp_path / "splits")


def test_unknown_format_names_the_supported_ones(tmp_path):
    path = tmp_path / "tickets.xlsx"
    path.write_text("x")
    with pytest.raises(DistilflowError, match="unknown format; use a .jsonl, .json, .csv or .parquet file"):
        data.read_rows(path)


def test_directory_that_is_not_a_saved_dataset_is_an_error(tmp_path):
    with pytest.raises(DistilflowError, match="not a saved `datasets` dataset"):
        data.read_rows(tmp_path)


def test_csv_with_only_a_header_is_empty(tmp_path):
    path = tmp_path / "empty.csv"
    path.write_text("text,label\n")
    with pytest.raises(DistilflowError, match="empty"):
        data.read_rows(path)


def test_fields_map_template_fields_to_other_columns(tiny_cfg, tmp_path):
    rows = [{"body": t["text"], "label": t["label"]} for t in TICKETS]
    task = with_data(tiny_cfg, write_rows(tmp_path, rows)).model_copy(
        update={"fields": {"text": "body"}, "eval_size": 4})
    split = data.load_task_data(task, 0)
    assert all(row["text"] == row["body"] for row in split.train + split.eval)


def test_mapped_column_missing_is_named(tiny_cfg, tmp_path):
    task = with_data(tiny_cfg, write_rows(tmp_path, TICKETS)).model_copy(update={"fields": {"text": "body"}})
    with pytest.raises(DistilflowError, match=r"example 1 has no column body \(task.fields.text\)"):
        data.load_task_data(task, 0)


def test_empty_csv_label_means_unlabelled(tiny_cfg):
    assert data.label({"text": "x", "label": ""}, tiny_cfg.task) is None


def test_json_labels_are_written_as_compact_json(tiny_cfg):
    assert data.label({"label": {"name": "Ada"}}, tiny_cfg.task) == '{"name": "Ada"}'


def test_label_failing_a_regex_check_is_named(tiny_cfg, tmp_path):
    from distilflow.configs.schema import RegexCheck

    task = with_data(tiny_cfg, write_rows(tmp_path, [{"text": "x", "label": "2024-13"}])).model_copy(
        update={"check": RegexCheck(type="regex", pattern=r"\d{4}-\d{2}-\d{2}")})
    with pytest.raises(DistilflowError, match=r"example 1 has label '2024-13', which task.check rejects: does not"):
        data.load_task_data(task, 0)


def test_label_failing_the_json_schema_is_named(tiny_cfg, tmp_path):
    from distilflow.configs.schema import JsonSchemaCheck

    schema = {"type": "object", "required": ["name"]}
    task = with_data(tiny_cfg, write_rows(tmp_path, [{"text": "x", "label": {"age": 3}}])).model_copy(
        update={"check": JsonSchemaCheck(type="json_schema", json_schema=schema)})
    with pytest.raises(DistilflowError, match="example 1 has label .* fails the JSON schema: 'name' is a required"):
        data.load_task_data(task, 0)


def test_few_shot_examples_of_a_free_form_task_are_labelled(tiny_cfg, tmp_path):
    from distilflow.configs.schema import RegexCheck

    rows = [{"text": f"t{i}", "label": f"{i}"} for i in range(10)] + [{"text": "unlabelled"}]
    task = with_data(tiny_cfg, write_rows(tmp_path, rows)).model_copy(
        update={"check": RegexCheck(type="regex", pattern=r"\d+")})
    shots = data.few_shot_examples(rows, task, k=3, seed=0)
    assert len(shots) == 3 and all("label" in s for s in shots)
