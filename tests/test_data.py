"""Task data: a seeded split every stage shares, few-shot examples, prompts, and bad data caught early."""

import json
import os

import pytest

from distilflow.tasks import checks, data
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
    assert all(checks.label(r, tiny_cfg.task) for r in first.eval)
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
    assert len(split.pool) == tiny_cfg.task.few_shot_pool and all(checks.label(r, tiny_cfg.task) for r in split.pool)
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
    with pytest.raises(DistilflowError, match="unknown format; use a .jsonl, .json, .csv, .tsv or .parquet file"):
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
    assert checks.label({"text": "x", "label": ""}, tiny_cfg.task) is None


def test_json_labels_are_written_as_compact_json(tiny_cfg):
    assert checks.label({"label": {"name": "Ada"}}, tiny_cfg.task) == '{"name": "Ada"}'


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


# ---- encodings, delimiters and the types of text columns --------------------------------------------------

SPREADSHEET_ROWS = [("My card was charged twice", "payment"), ("Parcel never arrived", "delivery"),
           ("App crashes on start", "bug"), ("Cannot log in", "account")] * 6


def csv_bytes(rows, delimiter=",", header=("text", "label")) -> str:
    return "\n".join([delimiter.join(header)] + [delimiter.join(row) for row in rows]) + "\n"


def task_for(tiny_cfg, path, **update):
    return with_data(tiny_cfg, path).model_copy(update={"eval_size": 4, "few_shot_pool": None, "max_train": None, **update})


@pytest.mark.parametrize("encoding, byte", [("latin-1", "0xe9"), ("cp1252", "0x93")])
def test_a_spreadsheet_csv_that_is_not_utf8_is_refused_with_where_and_how_to_convert(tiny_cfg, tmp_path, encoding, byte):
    path = tmp_path / "tickets.csv"
    rows = SPREADSHEET_ROWS[:5] + [("Charged \u201ctwice\u201d" if encoding == "cp1252" else "Carte débitée", "payment")]
    path.write_bytes(csv_bytes(rows).encode(encoding, errors="replace"))
    with pytest.raises(DistilflowError) as caught:
        data.load_task_data(task_for(tiny_cfg, path), 0)
    assert f"{path}: line 7, column " in str(caught.value) and f"not UTF-8 text (byte {byte})" in str(caught.value)
    assert "iconv -f cp1252 -t utf-8" in str(caught.value)


@pytest.mark.parametrize("encoding", ["utf-8-sig", "utf-16"])
def test_a_csv_with_a_byte_order_mark_is_read_with_its_first_column_named_right(tiny_cfg, tmp_path, encoding):
    path = tmp_path / "tickets.csv"
    path.write_text(csv_bytes(SPREADSHEET_ROWS + [("Colis abîmé", "delivery")]), encoding=encoding)
    rows = data.read_rows(path)
    assert list(rows[0]) == ["text", "label"] and rows[-1]["text"] == "Colis abîmé"


@pytest.mark.parametrize("delimiter, suffix", [(";", ".csv"), ("\t", ".csv"), ("\t", ".tsv")])
def test_a_semicolon_or_tab_separated_file_is_read_by_its_header(tmp_path, delimiter, suffix):
    path = tmp_path / f"tickets{suffix}"
    path.write_text(csv_bytes(SPREADSHEET_ROWS, delimiter))
    assert data.read_rows(path)[0] == {"text": "My card was charged twice", "label": "payment"}


def test_a_csv_line_with_more_cells_than_the_header_is_named(tmp_path):
    path = tmp_path / "tickets.csv"
    path.write_text(csv_bytes(SPREADSHEET_ROWS[:2]) + "Refund, please,payment\n")
    with pytest.raises(DistilflowError, match=r"line 4 has 3 cells but the header names 2 columns"):
        data.read_rows(path)


def test_a_csv_header_naming_a_column_twice_is_refused(tmp_path):
    path = tmp_path / "tickets.csv"
    path.write_text(csv_bytes(SPREADSHEET_ROWS[:2], header=("text", "text")))
    with pytest.raises(DistilflowError, match=r"names column\(s\) \['text'\] more than once"):
        data.read_rows(path)


def test_a_label_field_typo_is_blamed_on_label_field_not_eval_size(tiny_cfg):
    task = tiny_cfg.task.model_copy(update={"label_field": "lable"})
    with pytest.raises(DistilflowError) as caught:
        data.load_task_data(task, 0)
    message = str(caught.value)
    assert message.startswith("task.label_field: no example in") and "did you mean 'label'?" in message
    assert "eval_size" not in message


@pytest.mark.parametrize("value, shown", [(42, "Ticket: 42"), (2.5, "Ticket: 2.5"), (True, "Ticket: true"),
                                          ({"subject": "refund"}, 'Ticket: {"subject": "refund"}'),
                                          (["a", "b"], 'Ticket: ["a", "b"]')])
def test_a_text_field_that_is_no_string_is_written_into_the_prompt_as_json(tiny_cfg, tmp_path, value, shown):
    rows = [{"text": value, "label": "bug"}] + [{"text": t, "label": label} for t, label in SPREADSHEET_ROWS]
    split = data.load_task_data(task_for(tiny_cfg, write_rows(tmp_path, rows)), 0)
    row = next(r for r in split.train + split.eval if r["text"] == value)
    assert data.user_message(row, tiny_cfg.task) == shown


@pytest.mark.parametrize("line, shown", [('{"text": NaN, "label": "bug"}', "nan"), ('{"text": "", "label": "bug"}', "empty"),
                                         ('{"text": "  ", "label": "bug"}', "empty")])
def test_a_text_field_with_no_faithful_text_is_refused(tiny_cfg, tmp_path, line, shown):
    path = tmp_path / "tickets.jsonl"
    path.write_text("".join(json.dumps({"text": t, "label": label}) + "\n" for t, label in SPREADSHEET_ROWS) + line + "\n")
    with pytest.raises(DistilflowError, match="example 25") as caught:
        data.load_task_data(task_for(tiny_cfg, path), 0)
    assert ("cannot go into a prompt" if shown == "nan" else "(or it is empty)") in str(caught.value)


def test_a_latin_1_jsonl_file_is_refused_and_a_utf8_bom_is_accepted(tmp_path):
    path = tmp_path / "tickets.jsonl"
    path.write_bytes('{"text": "problème", "label": "bug"}\n'.encode("latin-1"))
    with pytest.raises(DistilflowError, match="line 1, column 16: not UTF-8 text"):
        data.read_rows(path)
    path.write_bytes('{"text": "problème", "label": "bug"}\n'.encode("utf-8-sig"))
    assert data.read_rows(path) == [{"text": "problème", "label": "bug"}]


def test_a_data_split_for_a_plain_file_is_refused_not_ignored(tmp_path):
    path = write_rows(tmp_path, [{"text": "a", "label": "bug"}])
    with pytest.raises(DistilflowError, match="task.data_split is 'train', but .* is a file"):
        data.read_rows(path, "train")


def test_a_pipe_named_like_a_data_file_is_refused_not_read_for_ever(tmp_path):
    os.mkfifo(tmp_path / "tickets.jsonl")
    with pytest.raises(DistilflowError, match="is not a regular file"):
        data.read_rows(tmp_path / "tickets.jsonl")
# --- the calibration set: the task's prompts and answers as the model reads them ---------------------------

def chat_dataset():
    from datasets import Dataset

    return Dataset.from_list([{"prompt": [{"role": "user", "content": f"ticket {i}"}],
                               "completion": [{"role": "assistant", "content": "bug"}]} for i in range(3)])


def test_calibration_batches_start_with_one_bos_when_the_tokenizer_adds_one():
    from transformers import AutoTokenizer

    from tests.conftest import TINY_TEACHER

    # Like Llama 3's: the tokenizer adds a BOS, and the chat template already writes it (here <|im_start|>).
    tokenizer = AutoTokenizer.from_pretrained(TINY_TEACHER, add_bos_token=True)
    assert tokenizer("x").input_ids[0] == tokenizer.bos_token_id
    texts = data.calibration_texts(tokenizer, chat_dataset(), samples=3)
    assert all(text.startswith(tokenizer.bos_token) for text in texts)
    (batch,) = data.token_batches(tokenizer, texts, "cpu")
    assert batch.input_ids[:, 0].eq(tokenizer.bos_token_id).all()
    assert batch.input_ids[:, 1].ne(tokenizer.bos_token_id).all()


def test_token_batches_pad_on_the_right_without_changing_the_tokenizer(tiny_teacher):
    _, tokenizer = tiny_teacher
    side = tokenizer.padding_side
    (batch,) = data.token_batches(tokenizer, ["a", "a much longer text than the first"], "cpu")
    assert batch.attention_mask[0, 0] == 1 and batch.attention_mask[0, -1] == 0
    assert tokenizer.padding_side == side
