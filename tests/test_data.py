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


def test_few_shot_examples_show_every_label(tiny_cfg):
    split = data.load_task_data(tiny_cfg.task, 0)
    shots = data.few_shot_examples(split.train, tiny_cfg.task, k=4, seed=0)
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
