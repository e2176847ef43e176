"""The one check: the filter in rejection sampling, the metric in evaluation, the reward in RL."""

import json

import pytest

from distilflow.configs.schema import TaskConfig
from distilflow.flows.retries import is_transient
from distilflow.tasks import checks, data
from distilflow.tasks.errors import DistilflowError
from distilflow.tasks.evaluate import task_score
from tests.conftest import REPO

DATA = REPO / "configs" / "data" / "support_tickets.jsonl"
PERSON = {"type": "object", "properties": {"name": {"type": "string"}, "age": {"type": "integer"}},
          "required": ["name", "age"]}


def task_with(check: dict, base_dir=REPO) -> TaskConfig:
    return TaskConfig.model_validate({"data": str(DATA), "check": check}, context={"base_dir": base_dir})


CHOICE = task_with({"type": "choice", "choices": ["yes", "no"]})
DATE = task_with({"type": "regex", "pattern": r"\d{4}-\d{2}-\d{2}"})
PERSON_TASK = task_with({"type": "json_schema", "json_schema": PERSON})


def test_choice_accepts_only_a_listed_label():
    assert checks.is_valid("yes", CHOICE) and not checks.is_valid("Yes", CHOICE)


def test_choice_scores_accuracy_against_the_label():
    assert checks.score("yes", {"label": "yes"}, CHOICE) == 1.0
    assert checks.score("no", {"label": "yes"}, CHOICE) == 0.0


def test_unlabelled_row_scores_validity_alone():
    assert checks.score("no", {}, CHOICE) == 1.0 and checks.score("maybe", {}, CHOICE) == 0.0


def test_regex_must_match_the_whole_answer():
    assert checks.is_valid("2024-01-31", DATE)
    assert not checks.is_valid("on 2024-01-31", DATE)


def test_regex_exact_match_ignores_case_and_whitespace():
    task = task_with({"type": "regex", "pattern": r"(?i)[a-z ]+"})
    assert checks.score("New  York", {"label": "new york"}, task) == 1.0


def test_regex_accuracy_metric_is_character_exact():
    task = task_with({"type": "regex", "pattern": r"(?i)[a-z ]+", "metric": "accuracy"})
    assert checks.score("New York", {"label": "new york"}, task) == 0.0


def test_json_schema_answer_must_parse_and_validate():
    assert checks.is_valid('{"name": "Ada", "age": 36}', PERSON_TASK)
    assert checks.problem('{"name": "Ada"}', PERSON_TASK).startswith("fails the JSON schema")
    assert checks.problem("name: Ada", PERSON_TASK) == "not JSON"


def test_json_answer_in_a_code_fence_is_read():
    assert checks.is_valid('```json\n{"name": "Ada", "age": 36}\n```', PERSON_TASK)


def test_field_f1_gives_partial_credit_per_field():
    row = {"label": {"name": "Ada", "age": 36, "city": "London"}}
    task = task_with({"type": "json_schema", "json_schema": {"type": "object"}})
    # 2 of 3 predicted fields right, 2 of 3 reference fields found: F1 = 2/3.
    assert checks.score('{"name": "Ada", "age": 36, "city": "Paris"}', row, task) == pytest.approx(2 / 3)


def test_field_f1_compares_nested_fields_by_path():
    assert checks.field_f1('{"a": {"b": 1, "c": 2}}', '{"a": {"b": 1, "c": 3}}') == pytest.approx(0.5)


def test_field_f1_counts_only_fields_with_a_value_a_correct_null_is_neither_hit_nor_miss():
    reference = '{"queue": "bug", "order_id": null, "amount": null}'
    assert checks.field_f1('{"queue": "bug", "order_id": null, "amount": null}', reference) == 1.0
    # Extracting nothing gets no credit for the nulls it happens to share with the label.
    assert checks.field_f1('{"queue": "payment", "order_id": null, "amount": null}', reference) == 0.0


def test_field_f1_a_value_where_the_label_has_null_is_a_false_positive():
    # 1 of 2 predicted pairs right, 1 of 1 reference pair found: F1 = 2/3.
    assert checks.field_f1('{"queue": "bug", "amount": 49}', '{"queue": "bug", "amount": null}') \
        == pytest.approx(2 / 3)


def test_field_f1_a_null_where_the_label_has_a_value_is_a_false_negative():
    assert checks.field_f1('{"queue": "bug", "amount": null}', '{"queue": "bug", "amount": 49}') \
        == pytest.approx(2 / 3)


def test_field_f1_compares_numbers_by_value_but_not_a_string_with_a_number():
    assert checks.field_f1('{"amount": 49.0}', '{"amount": 49}') == 1.0
    assert checks.field_f1('{"amount": "49"}', '{"amount": 49}') == 0.0


def test_field_f1_an_extra_key_with_a_value_costs_precision_an_extra_null_costs_nothing():
    assert checks.field_f1('{"queue": "bug", "city": "Lyon"}', '{"queue": "bug"}') == pytest.approx(2 / 3)
    assert checks.field_f1('{"queue": "bug", "city": null}', '{"queue": "bug"}') == 1.0


def test_field_f1_of_an_answer_that_is_not_json_is_zero():
    assert checks.field_f1("the queue is bug", '{"queue": "bug"}') == 0.0


def test_a_json_answer_is_canonical_as_labels_are_written():
    task = task_with({"type": "json_schema", "json_schema": PERSON})
    assert checks.canonical('```json\n{"name":"Ada",  "age": 36}\n```', task) == '{"name": "Ada", "age": 36}'
    assert checks.canonical("not json", task) == "not json"
    assert checks.canonical(" yes", CHOICE) == " yes"


def test_json_exact_match_compares_parsed_values():
    task = task_with({"type": "json_schema", "json_schema": PERSON, "metric": "exact_match"})
    assert checks.score('{"age": 36, "name": "Ada"}', {"label": '{"name": "Ada", "age": 36}'}, task) == 1.0


def write_module(tmp_path, body: str):
    path = tmp_path / "my_checks.py"
    path.write_text(body)
    return path


def test_python_check_scores_with_the_users_function(tmp_path):
    write_module(tmp_path, "def overlap(answer, row):\n"
                           "    words = set(row['label'].split())\n"
                           "    return len(words & set(answer.split())) / len(words)\n")
    task = task_with({"type": "python", "function": "my_checks.py:overlap"}, base_dir=tmp_path)
    assert checks.score("red green", {"label": "red green blue blue"}, task) == pytest.approx(2 / 3)


def test_python_check_takes_an_importable_module(tmp_path, monkeypatch):
    write_module(tmp_path, "def always(answer, row):\n    return 1\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    task = task_with({"type": "python", "function": "my_checks:always"})
    assert checks.score("anything", {}, task) == 1.0


def test_python_check_score_outside_unit_interval_is_an_error(tmp_path):
    write_module(tmp_path, "def too_big(answer, row):\n    return 1.5\n")
    task = task_with({"type": "python", "function": "my_checks.py:too_big"}, base_dir=tmp_path)
    with pytest.raises(DistilflowError, match=r"returned 1.5 .* must return a number in \[0, 1\]"):
        checks.score("x", {}, task)


def test_a_python_check_that_raises_names_the_function_and_the_answer(tmp_path):
    write_module(tmp_path, "import json\ndef strict(answer, row):\n    return json.loads(answer)['score']\n")
    task = task_with({"type": "python", "function": "my_checks.py:strict"}, base_dir=tmp_path)
    with pytest.raises(DistilflowError) as caught:
        checks.score("not json at all", {}, task)
    message = str(caught.value)
    assert "my_checks.py:strict raised JSONDecodeError" in message and "'not json at all'" in message
    assert not is_transient(caught.value)


def test_a_python_check_may_return_a_numpy_number(tmp_path):
    write_module(tmp_path, "import numpy\ndef half(answer, row):\n    return numpy.float32(0.5)\n")
    task = task_with({"type": "python", "function": "my_checks.py:half"}, base_dir=tmp_path)
    assert checks.score("x", {}, task) == 0.5


def test_task_score_is_the_mean_of_the_checks_scores():
    rows = [{"label": "yes"}, {"label": "no"}, {"label": "no"}, {}]
    assert task_score(["yes", "yes", "no", "no"], rows, CHOICE) == 0.75


def test_describe_names_the_allowed_answers():
    assert checks.describe(CHOICE) == "one of `yes`, `no`"
    assert json.dumps(PERSON) in checks.describe(PERSON_TASK)


def test_a_python_check_that_raises_on_a_label_fails_when_the_data_is_read(tmp_path):
    write_module(tmp_path, "def picky(answer, row):\n    return {'bug': 1.0}[answer]\n")
    task = task_with({"type": "python", "function": "my_checks.py:picky"}, base_dir=tmp_path)
    with pytest.raises(DistilflowError, match=r"example \d+, scoring its label: task.check.function .*picky raised KeyError"):
        data.load_task_data(task.model_copy(update={"eval_size": 4}), 0)
