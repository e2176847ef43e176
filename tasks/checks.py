"""The task's check: whether an answer is valid, and how good it is (0..1).

One function serves three roles: the filter in rejection sampling, the metric in evaluation and
the reward in RL, so every stage agrees on what a good answer is. The check kinds (config
`task.check.type`): `choice` (one of the labels), `regex` (the whole answer matches),
`json_schema` (the answer parses and validates) and `python` (a user function scores it).
"""

import functools
import json
import numbers
import re
from collections.abc import Callable

from distilflow.configs.schema import TaskConfig, import_function
from distilflow.tasks.errors import DistilflowError


def is_valid(answer: str, task: TaskConfig) -> bool:
    """The answer has the required form: one of the labels, a match of the pattern, JSON that
    validates against the schema; for a `python` check, any non-empty answer (the function judges it)."""
    return problem(answer, task) is None


def problem(answer: str, task: TaskConfig) -> str | None:
    """Why ``answer`` does not have the task's form, or None when it does."""
    check = task.check
    if check.type == "choice":
        return None if answer in check.choices else f"not one of {check.choices}"
    if check.type == "regex":
        return None if _pattern(check.pattern).fullmatch(answer) else f"does not match {check.pattern!r}"
    if check.type == "json_schema":
        parsed = parse_json(answer)
        if parsed is None:
            return "not JSON"
        from jsonschema.exceptions import best_match

        error = best_match(_schema_validator(json.dumps(check.json_schema, sort_keys=True)).iter_errors(parsed))
        return None if error is None else f"fails the JSON schema: {error.message}"
    return None if answer.strip() else "empty"


def score(answer: str, row: dict, task: TaskConfig) -> float:
    """How good ``answer`` is for ``row``, in [0, 1]: 0 for an invalid answer; against the row's label by
    the check's metric; for an unlabelled row, 1 for a valid answer; a `python` check's function decides."""
    check = task.check
    if check.type == "python":
        return _python_score(check.function, answer, row)
    if not is_valid(answer, task):
        return 0.0
    reference = label(row, task)
    if reference is None:
        return 1.0
    return METRICS[check.metric](answer, reference)


def label(row: dict, task: TaskConfig) -> str | None:
    """The reference answer of ``row`` as the text a model should write (JSON values as compact JSON),
    or None when it is unlabelled (no label field, null, or an empty CSV cell)."""
    value = row.get(task.label_field) if task.label_field else None
    if value is None or value == "":
        return None
    return value if isinstance(value, str) else json.dumps(value, ensure_ascii=False)


def canonical(answer: str, task: TaskConfig) -> str:
    """``answer`` as a student should learn it: for a json_schema task, its JSON value written the way labels
    are (``label``: compact JSON, no code fence), so answers equal as JSON are one text; others as given."""
    if task.check.type != "json_schema":
        return answer
    parsed = parse_json(answer)
    return answer if parsed is None else json.dumps(parsed, ensure_ascii=False)


def describe(task: TaskConfig) -> str:
    """What a valid answer is, in a sentence (for model cards and judge prompts)."""
    check = task.check
    if check.type == "choice":
        return "one of " + ", ".join(f"`{c}`" for c in check.choices)
    if check.type == "regex":
        return f"text matching the regular expression `{check.pattern}`"
    if check.type == "json_schema":
        return f"a JSON value valid against the schema `{json.dumps(check.json_schema)}`"
    return f"free text scored by `{check.function}`"


def same_answer(answer: str, reference: str, task: TaskConfig) -> bool:
    """``answer`` is valid and equal to ``reference`` as a whole (as JSON: whatever its spacing and key order)."""
    return is_valid(answer, task) and bool(exact_match(answer, reference))


# ---- metrics: answer vs reference label, both strings ------------------------------------------------

def accuracy(answer: str, reference: str) -> float:
    return float(answer == reference)


def exact_match(answer: str, reference: str) -> float:
    """Equal after normalising case and whitespace; for JSON, the parsed values are equal."""
    parsed, expected = parse_json(answer), parse_json(reference)
    if parsed is not None and expected is not None:
        return float(parsed == expected)
    return float(_normalise(answer) == _normalise(reference))


def field_f1(answer: str, reference: str) -> float:
    """F1 between the (field path, value) pairs of two JSON objects: partial credit per field.

    Slot-filling F1, as information extraction scores it: only fields with a value count. A null (or
    absent) field says "not mentioned", so a null predicted for a null label is a true negative and
    counts nowhere; a value where the label has null is a false positive, a null where it has a value
    a false negative, and a key the label lacks, with a value, a false positive. Counting correct
    nulls as matches instead would give most of the score to an answer that extracts nothing.
    Numbers compare by value (49 equals 49.0); a string is not a number ("49" is not 49: the
    consumer of the object reads types, and a json_schema check rejects the string first). Two
    objects without any value (both all null) agree: 1.
    """
    predicted, expected = _field_pairs(parse_json(answer)), _field_pairs(parse_json(reference))
    if not predicted and not expected:
        return 1.0
    matched = len(predicted & expected)
    if matched == 0:
        return 0.0
    precision, recall = matched / len(predicted), matched / len(expected)
    return 2 * precision * recall / (precision + recall)


METRICS: dict[str, Callable[[str, str], float]] = {"accuracy": accuracy, "exact_match": exact_match,
                                                    "field_f1": field_f1}


def _normalise(text: str) -> str:
    return " ".join(text.split()).casefold()


def _field_pairs(value, prefix: str = "") -> set[tuple[str, str]]:
    """{"a": {"b": 1}, "c": [2], "d": null} -> {("a.b", "1"), ("c", "[2]")}: null fields make no pair; a
    non-object is one pair at the root."""
    if isinstance(value, dict):
        return {pair for key, item in value.items() for pair in _field_pairs(item, f"{prefix}{key}.")}
    if value is None:
        return set()
    return {(prefix.rstrip("."), json.dumps(_by_value(value), sort_keys=True))}


def _by_value(value):
    """``value`` with every whole float written as an integer, so 49.0 and 49 are one number."""
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, list):
        return [_by_value(item) for item in value]
    if isinstance(value, dict):
        return {key: _by_value(item) for key, item in value.items()}
    return value


_FENCE = re.compile(r"^```(?:json)?\s*(.*?)\s*```$", re.DOTALL)


def parse_json(text: str):
    """The JSON value in ``text`` (a Markdown code fence around it is allowed), or None."""
    text = text.strip()
    fenced = _FENCE.match(text)
    try:
        return json.loads(fenced.group(1) if fenced else text)
    except json.JSONDecodeError:
        return None


@functools.lru_cache(maxsize=64)
def _pattern(pattern: str) -> re.Pattern:
    return re.compile(pattern)


@functools.lru_cache(maxsize=16)
def _schema_validator(schema_json: str):
    from jsonschema import validators  # imported where used: only json_schema tasks need it

    schema = json.loads(schema_json)
    return validators.validator_for(schema)(schema)


# ---- python checks ----------------------------------------------------------------------------------

def _python_score(ref: str, answer: str, row: dict) -> float:
    try:
        value = import_function(ref)(answer, row)
    except Exception as err:  # the user's function: its failure is theirs to fix, with the input that broke it
        raise DistilflowError(f"task.check.function {ref} raised {type(err).__name__}: {err} for the answer "
                              f"{answer[:80]!r}; it must return a number in [0, 1] for any answer, malformed ones "
                              "included (the log has its traceback)") from err
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not 0.0 <= value <= 1.0:
        raise DistilflowError(f"task.check.function {ref} returned {value!r} for the answer {answer[:80]!r}; "
                              "it must return a number in [0, 1]")
    return float(value)
