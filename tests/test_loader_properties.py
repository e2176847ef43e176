"""Everything distilflow reads from a user or from its own disk, fed whatever Hypothesis generates: config YAML and
`--set` values, task data in every format and encoding, bundle manifests, the run history. Each input loads, or it
is one DistilflowError (the CLI's one `error:` line, exit 2); never another exception, which would be a traceback
and exit 1. A few runs of the CLI itself check that contract end to end.

`make test` tries a few dozen inputs per property (the `fast` profile, tests/conftest.py); `make test-slow` many more
(`slow`). A failure prints the smallest input that breaks the property."""

import contextlib
import csv
import io
import json
import os
import uuid
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml
from hypothesis import example, given, settings
from hypothesis import strategies as st

from distilflow.configs.loader import load_config, parse_overrides
from distilflow.flows.cli import main
from distilflow.tasks import artifacts, data, history
from distilflow.tasks.errors import DistilflowError
from distilflow.tasks.tracking import flatten
from tests.conftest import REPO, TINY_CONFIG, TINY_TEACHER

pytestmark = pytest.mark.properties

TICKETS = REPO / "configs" / "data" / "support_tickets.jsonl"
CHOICES = ["payment", "delivery", "bug", "account"]
TINY_TASK = load_config(TINY_CONFIG).task
# The CLI runs are slower (preflight, a tokenizer): a tenth as many.
CLI_EXAMPLES = max(3, settings.default.max_examples // 10)


@pytest.fixture(scope="module")
def scratch(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("generated")


def fresh(scratch: Path) -> Path:
    """A new directory per generated input (Hypothesis calls a test many times with one fixture)."""
    directory = scratch / uuid.uuid4().hex[:12]
    directory.mkdir()
    return directory


def loads_or_one_error(load):
    """``load()``'s result, or None where it raised a DistilflowError with a message; any other exception fails."""
    try:
        return load()
    except DistilflowError as err:
        assert str(err).strip(), "a DistilflowError without a message"
        return None


def one_error_line_or_valid(argv: list[str], environ: dict[str, str] = {}) -> str:
    """Run the CLI in-process: exit 0, or exit 2 with exactly one `error:` line; never a traceback."""
    stderr, stdout = io.StringIO(), io.StringIO()
    with contextlib.redirect_stderr(stderr), contextlib.redirect_stdout(stdout), environment(environ):
        code = main(argv)
    said = stderr.getvalue()
    assert code in (0, 2) and "Traceback" not in said, said[-3000:]
    if code == 2:
        assert [line.startswith("error:") for line in said.splitlines()].count(True) == 1, said[-3000:]
    return said


@contextlib.contextmanager
def environment(variables: dict[str, str]):
    saved = {key: os.environ.get(key) for key in variables}
    os.environ.update(variables)
    try:
        yield
    finally:
        for key, value in saved.items():
            os.environ.pop(key) if value is None else os.environ.__setitem__(key, value)


# --- config YAML and --set ------------------------------------------------------------------------------------------

def tiny_raw(workdir: Path) -> dict:
    """configs/tiny.yaml as data, its paths absolute (the generated file lives elsewhere)."""
    raw = yaml.safe_load(TINY_CONFIG.read_text())
    raw["run"]["workdir"] = str(workdir)
    raw["task"]["data"] = str(TICKETS)
    raw["prototype"]["teacher"]["path"] = str(TINY_TEACHER)
    return raw


scalars = st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=40)
yaml_values = st.recursive(scalars, lambda inner: st.lists(inner, max_size=4) |
                           st.dictionaries(st.text(max_size=12), inner, max_size=4), max_leaves=10)


def key_paths(tree: dict, prefix: tuple = ()) -> list[tuple]:
    """Every key of a nested mapping, as a path: sections and leaves."""
    return [path for key, value in tree.items() for path in
            [prefix + (key,), *(key_paths(value, prefix + (key,)) if isinstance(value, dict) else [])]]


def mutated(raw: dict, data_strategy) -> dict:
    """``raw`` with one to three keys replaced by any YAML value, deleted, or added beside a known one."""
    for _ in range(data_strategy.draw(st.integers(1, 3))):
        *parents, leaf = data_strategy.draw(st.sampled_from(key_paths(raw)))
        node = raw
        for part in parents:
            node = node[part]
        action = data_strategy.draw(st.sampled_from(["replace", "delete", "add"]))
        if action == "delete":
            del node[leaf]
        elif action == "add":
            node[data_strategy.draw(st.text(max_size=12))] = data_strategy.draw(yaml_values)
        else:
            node[leaf] = data_strategy.draw(yaml_values)
    return raw


@given(st.data())
def test_a_config_with_any_value_at_any_key_loads_or_is_one_error(scratch, data):
    directory = fresh(scratch)
    config = directory / "config.yaml"
    config.write_text(yaml.safe_dump(mutated(tiny_raw(directory / "work"), data), allow_unicode=True))
    loads_or_one_error(lambda: load_config(config))


@given(st.binary(max_size=400) | st.text(max_size=400).map(lambda text: text.encode("utf-8", "surrogatepass")))
@example(b"[" * 5000)  # nesting deeper than the YAML parser's recursion
@example(b"\xef\xbb\xbfrun: {name: tiny}\n")
@example("run:\n  name: \x00\x07\u202e\n".encode())
def test_any_bytes_as_a_config_file_load_or_are_one_error(scratch, content):
    config = fresh(scratch) / "config.yaml"
    config.write_bytes(content)
    loads_or_one_error(lambda: load_config(config))


CONFIG_KEYS = sorted(flatten(load_config(TINY_CONFIG).model_dump(mode="json")))


@given(key=st.sampled_from(CONFIG_KEYS) | st.text(max_size=30), value=st.text(max_size=60))
@example(key="run.workdir", value="\x00")
@example(key="task.data", value="~nosuchuser/x.jsonl")
@example(key="run.seed", value="1e400")
@example(key="distill.sft.max_steps", value="[[[[[[[[")
@example(key="task.check", value="{type: regex, pattern: '('}")
def test_any_set_assignment_loads_or_is_one_error(scratch, key, value):
    workdir = fresh(scratch) / "work"
    loads_or_one_error(lambda: load_config(TINY_CONFIG, {"run.workdir": str(workdir),
                                                         **parse_overrides([f"{key}={value}"])}))


@settings(max_examples=CLI_EXAMPLES)
@given(key=st.sampled_from(CONFIG_KEYS), value=st.text(max_size=30))
def test_distilflow_validate_with_any_set_value_is_valid_or_one_error_line(scratch, key, value):
    one_error_line_or_valid(["validate", str(TINY_CONFIG), "--set", f"run.workdir={fresh(scratch) / 'work'}",
                             "--set", f"{key}={value}"])


# --- task data -------------------------------------------------------------------------------------------------------

texts = st.text(max_size=60) | st.integers(10_000, 200_000).map(lambda n: "é" * n)  # arbitrary, or huge
values = texts | st.none() | st.booleans() | st.integers() | st.floats() | st.lists(st.integers(), max_size=3)
labels = st.sampled_from(CHOICES) | st.none() | st.just(float("nan")) | texts | st.integers()
rows_strategy = st.lists(st.fixed_dictionaries({}, optional={"text": values, "label": labels, "id": values}).flatmap(
    lambda row: st.dictionaries(st.text(max_size=8), values, max_size=2).map(lambda extra: {**extra, **row})),
    max_size=12)
FORMATS = ["jsonl", "json", "csv", "tsv", "parquet"]
ENCODINGS = ["utf-8", "utf-8-sig", "utf-16", "latin-1", "cp1252"]


def labelled_tickets(count: int) -> list[dict]:
    return [json.loads(line) for line in TICKETS.read_text().splitlines()[:count]]


def written(rows: list[dict], directory: Path, suffix: str, encoding: str, delimiter: str) -> Path:
    """``rows`` as a file of the format ``suffix``; text formats in ``encoding`` (characters it cannot hold become
    "?")."""
    path = directory / f"data.{suffix}"
    if suffix == "parquet":
        pq.write_table(pa.Table.from_pylist(parquet_columns(rows)), path)
        return path
    if suffix in ("csv", "tsv"):
        text = io.StringIO(newline="")
        columns = list(dict.fromkeys(column for row in rows for column in row))
        writer = csv.writer(text, delimiter="\t" if suffix == "tsv" else delimiter)
        writer.writerows([columns] + [["" if row.get(c) is None else str(row.get(c)) for c in columns] for row in rows])
        text = text.getvalue()
    elif suffix == "jsonl":
        text = "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)
    else:
        text = json.dumps(rows, ensure_ascii=False)
    path.write_bytes(text.encode(encoding, "replace"))
    return path


def parquet_columns(rows: list[dict]) -> list[dict]:
    """Parquet holds one type per column, integers of 64 bits: a column of mixed types, of lists or of larger integers
    is written as JSON text."""
    columns = {column for row in rows for column in row}
    mixed = {c for c in columns if len({type(row[c]) for row in rows if row.get(c) is not None}) > 1 or
             any(isinstance(row.get(c), list) or
                 (isinstance(row.get(c), int) and not -2**63 <= row[c] < 2**63) for row in rows)}
    return [{c: (json.dumps(row.get(c)) if c in mixed else row.get(c)) for c in columns} for row in rows]


@given(rows=rows_strategy, labelled=st.integers(0, 12), suffix=st.sampled_from(FORMATS),
       encoding=st.sampled_from(ENCODINGS), delimiter=st.sampled_from([",", ";", "\t"]),
       label_field=st.sampled_from(["label", None]), seed=st.integers(0, 2**32))
@example(rows=[{"text": "é" * 200_000, "label": "bug"}], labelled=8, suffix="csv", encoding="utf-8", delimiter=",",
         label_field="label", seed=0)  # a cell beyond the csv module's default limit (128K) was a csv.Error
def test_task_data_in_any_format_loads_or_is_one_error(scratch, rows, labelled, suffix, encoding, delimiter,
                                                       label_field, seed):
    path = written(labelled_tickets(labelled) + rows, fresh(scratch), suffix, encoding, delimiter)
    task = TINY_TASK.model_copy(update={"data": path, "eval_size": 2, "few_shot_pool": 1, "max_train": None,
                                            "label_field": label_field})
    split = loads_or_one_error(lambda: data.load_task_data(task, seed))
    if split is not None:  # what loads makes prompts
        assert all(data.messages(row, task) for row in split.train + split.eval + split.pool)


@given(content=st.binary(max_size=600), suffix=st.sampled_from(FORMATS))
@example(content=b"text,label\n\x00,bug\n", suffix="csv")
@example(content=b'{"text": "a", "label": NaN}\n' * 4, suffix="jsonl")
@example(content=b"PAR1" + b"\x00" * 40 + b"PAR1", suffix="parquet")
@example(content=b"[" * 100_000, suffix="jsonl")
@example(content=b"[" * 100_000, suffix="json")
def test_any_bytes_as_task_data_load_or_are_one_error(scratch, content, suffix):
    path = fresh(scratch) / f"data.{suffix}"
    path.write_bytes(content)
    loads_or_one_error(lambda: data.load_task_data(TINY_TASK.model_copy(update={"data": path, "eval_size": 1}), 0))


# --- manifests -------------------------------------------------------------------------------------------------------

json_values = st.recursive(st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
                           lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner,
                                                                                        max_size=4), max_leaves=12)
names = st.sampled_from(["model.safetensors", "sub/config.json", "../outside", "/etc/hostname", "", ".", "a\x00b",
                         "manifest.json"]) | st.text(max_size=20)
manifests = (st.binary(max_size=300) |
             json_values.map(lambda value: json.dumps(value).encode()) |
             st.fixed_dictionaries({"files": st.dictionaries(names, st.text(max_size=64) | json_values, max_size=5)},
                                   optional={"links": st.dictionaries(names, st.text(max_size=30) | json_values,
                                                                      max_size=3)}).map(
                 lambda manifest: json.dumps(manifest).encode()))


def a_bundle(directory: Path) -> Path:
    (directory / "sub").mkdir()
    (directory / "model.safetensors").write_bytes(b"\x00" * 64)
    (directory / "sub" / "config.json").write_text("{}")
    return directory


@given(manifest=manifests)
@example(manifest=b"[" * 100_000)
def test_any_manifest_is_read_or_named_and_verify_lists_problems_never_raises(scratch, manifest):
    bundle = a_bundle(fresh(scratch))
    (bundle / artifacts.MANIFEST).write_bytes(manifest)
    assert all(isinstance(problem, str) and problem for problem in artifacts.manifest_problems(bundle))
    try:
        files, links = artifacts.read_manifest(bundle)
    except artifacts.ManifestError as err:
        assert str(err)
    else:
        assert all(isinstance(k, str) and isinstance(v, str) for k, v in {**files, **links}.items())


@settings(max_examples=CLI_EXAMPLES)
@given(manifest=manifests)
def test_distilflow_verify_of_any_manifest_passes_or_is_one_error_line(scratch, manifest):
    bundle = a_bundle(fresh(scratch))
    (bundle / artifacts.MANIFEST).write_bytes(manifest)
    one_error_line_or_valid(["verify", str(bundle)])


# --- the run history -------------------------------------------------------------------------------------------------

records = (st.binary(max_size=200) | json_values.map(lambda value: json.dumps(value).encode()) |
           st.fixed_dictionaries({"run_id": json_values, "journey": json_values, "bundle": json_values},
                                 optional={"release": json_values, "mlflow_run_id": json_values,
                                           "mlflow_tracking_uri": json_values}).map(
               lambda record: json.dumps(record).encode()))
index_lines = st.lists(st.binary(max_size=80) | json_values.map(json.dumps).map(str.encode) |
                       st.just(b"@RECORD@") | st.text(max_size=20).map(
                           lambda path: json.dumps({"run_id": "r", "record": path}).encode()), max_size=5)


def a_history(home: Path, lines: list[bytes], record: bytes) -> Path:
    """DISTILFLOW_HOME with the index ``lines`` (@RECORD@: a line naming a record file that holds ``record``)."""
    home.mkdir()
    (home / "record.json").write_bytes(record)
    line = json.dumps({"run_id": "r", "record": str(home / "record.json")}).encode()
    (home / history.INDEX).write_bytes(b"\n".join(line if each == b"@RECORD@" else each for each in lines))
    return home


@given(lines=index_lines, record=records)
@example(lines=[b"@RECORD@"], record=b'{"run_id": 1, "journey": 5, "bundle": 3}')
@example(lines=[b"[" * 100_000, b"@RECORD@"], record=b"[" * 100_000)
def test_any_run_history_gives_the_latest_run_or_one_error(scratch, lines, record):
    loads_or_one_error(lambda: history.latest_run(a_history(fresh(scratch) / "home", lines, record)))


@settings(max_examples=CLI_EXAMPLES)
@given(lines=index_lines, record=records, as_json=st.booleans())
@example(lines=[b"@RECORD@"], record=b'{"run_id": 1, "journey": 5, "bundle": 3}', as_json=False)
@example(lines=[b"@RECORD@"], record=b'{"run_id": "r", "journey": [{"state": 1}], "bundle": null}', as_json=False)
def test_distilflow_report_of_any_run_history_is_a_report_or_one_error_line(scratch, lines, record, as_json):
    home = a_history(fresh(scratch) / "home", lines, record)
    one_error_line_or_valid(["report", "--latest", *(["--json"] * as_json)], {"DISTILFLOW_HOME": str(home)})
