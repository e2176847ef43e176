"""Reads a YAML config, applies `--set` overrides and validates it, with errors that name key and file."""

import datetime
import difflib
import os
import re
import logging
import typing
import warnings
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError

from distilflow.configs.library_settings import DeprecatedKey
from distilflow.configs.schema import PipelineConfig
from distilflow.tasks.errors import DistilflowError

log = logging.getLogger("distilflow")


def load_config(path: str | Path, overrides: dict[str, Any] | None = None) -> PipelineConfig:
    """Load and validate ``path``; ``overrides`` maps dotted keys (``distill.lora.r``) to values."""
    path = Path(os.path.expanduser(os.path.expandvars(str(path)))).resolve()
    raw = _read_yaml(path)
    for key, value in (overrides or {}).items():
        _set_dotted(raw, key, value, path)
    raw.setdefault("run", {})  # validated with the file's directory, so a default workdir resolves there
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", DeprecatedKey)
            cfg = PipelineConfig.model_validate(raw, context={"base_dir": path.parent})
    except ValidationError as err:
        raise DistilflowError(_describe(err, path)) from None
    for warning in caught:  # a deprecated key is logged with the file that has it; other warnings as they were
        if issubclass(warning.category, DeprecatedKey):
            log.warning("%s: %s", path, warning.message)
        else:
            warnings.warn_explicit(warning.message, warning.category, warning.filename, warning.lineno)
    return cfg


def parse_overrides(assignments: list[str]) -> dict[str, Any]:
    """``["distill.lora.r=16"]`` -> ``{"distill.lora.r": 16}``; values are read as YAML, except that a key whose
    value is text (``run.name``, ``task.system_prompt``, ...) takes the text as written: ``--set run.name=007``
    is "007", not 7, ``--set "task.template=Ticket: {text}"`` is that text, not a YAML mapping, and
    ``--set task.system_prompt=no`` is "no", not false (``null`` still unsets it)."""
    overrides = {}
    for assignment in assignments:
        key, sep, text = assignment.partition("=")
        key = key.strip()
        if not sep or not key:
            raise DistilflowError(f"--set {assignment!r}: expected KEY=VALUE, e.g. --set distill.lora.r=16")
        try:
            value = yaml.safe_load(text) if text else ""
        except (yaml.YAMLError, RecursionError) as err:
            raise DistilflowError(f"--set {assignment!r}: the value is not valid YAML ({getattr(err, 'problem', err)}); "
                                  "quote it, e.g. --set 'task.system_prompt=\"a: b\"'") from None
        if value is not None and not isinstance(value, str) and _takes_text(key):
            value = text  # `{text}` in a template is not a YAML mapping, `no` in a prompt not false
        elif isinstance(value, int) and re.fullmatch(r"[-+]?0\d+", text.strip()):
            value = int(text, 10)  # YAML 1.1 reads 010 as octal 8
        overrides[key] = value
    return overrides


def _takes_text(key: str) -> bool:
    """Whether the config key ``key`` holds text only (``str`` or ``str | None``)."""
    model: type[BaseModel] = PipelineConfig
    *sections, leaf = key.split(".")
    for part in sections:
        field = model.model_fields.get(part)
        found = _sections(field.annotation) if field else []
        if len(found) != 1:
            return False  # not a plain section (unknown, or a union such as the teacher): validation decides
        model = found[0]
    field = model.model_fields.get(leaf)
    kinds = set(typing.get_args(field.annotation) or (field.annotation,)) if field else set()
    kinds = {typing.get_args(k)[0] if typing.get_origin(k) is typing.Annotated else k for k in kinds}
    return kinds - {type(None)} == {str}


def _read_yaml(path: Path) -> dict:
    if not path.is_file():
        raise DistilflowError(f"config file not found: {path}" if not path.exists() else
                              f"{path}: not a config file (a directory?)")
    try:
        data = yaml.load(decode_text(path.read_bytes(), path), Loader=_UniqueKeyLoader)
    except yaml.YAMLError as err:
        where = getattr(err, "problem_mark", None)
        line = f" line {where.line + 1}, column {where.column + 1}" if where else ""
        raise DistilflowError(f"{path}:{line}: not valid YAML ({getattr(err, 'problem', err)})") from None
    except RecursionError:
        raise DistilflowError(f"{path}: nested too deeply to be a config (unclosed brackets?)") from None
    if not isinstance(data, dict):
        raise DistilflowError(f"{path}: expected a mapping of config sections (run, task, prototype, ...)")
    return data


class _UniqueKeyLoader(yaml.SafeLoader):
    """YAML's safe loader, refusing a key given twice in one mapping (PyYAML silently keeps the last one, so a
    second `distill:` section would drop the first without a word)."""

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            if key in seen:
                raise yaml.constructor.ConstructorError(None, None, f"the key {key!r} appears twice in one mapping",
                                                        key_node.start_mark)
            seen.add(key)
        return super().construct_mapping(node, deep)


def decode_text(content: bytes, path: Path) -> str:
    """UTF-8 text (a byte-order mark allowed, as UTF-16 with its mark); anything else is refused with where the
    first undecodable byte is, since guessing an encoding can put silent garbage into prompts."""
    if content.startswith((b"\xff\xfe", b"\xfe\xff")):
        return content.decode("utf-16")
    try:
        return content.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        line = content.count(b"\n", 0, err.start) + 1
        column = err.start - (content.rfind(b"\n", 0, err.start) + 1) + 1
        raise DistilflowError(
            f"{path}: line {line}, column {column}: not UTF-8 text (byte 0x{content[err.start]:02x}); save it as "
            "UTF-8 (a spreadsheet's CSV export is often Windows-1252: `iconv -f cp1252 -t utf-8 IN > OUT`)") from None


def _set_dotted(raw: dict, key: str, value: Any, path: Path) -> None:
    node = raw
    *parents, leaf = key.split(".")
    for part in parents:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise DistilflowError(f"override {key}: {part} is a value, not a section (in {path})")
        node = child
    node[leaf] = value


def _describe(err: ValidationError, path: Path) -> str:
    lines = [f"{path}: invalid config ({err.error_count()} problem{'s' * (err.error_count() > 1)})"]
    for problem in err.errors():
        loc = _as_written(problem["loc"])
        key = ".".join(str(part) for part in loc)
        if problem["type"] == "extra_forbidden":
            lines.append(f"  {key}: unknown key{_did_you_mean(problem['loc'])}")
        elif problem["type"] == "library_settings":  # a section passed to TRL or PEFT: a line per key
            lines += [f"  {'.'.join(filter(None, (key, setting)))}: {text}"
                      for setting, text in problem["ctx"]["problems"]]
        elif problem["type"] == "missing":
            lines.append(f"  {key}: required key is missing")
        else:
            got = problem.get("input")
            shown = "" if isinstance(got, dict) else f" (got {got!r})"
            where = f"{key}: " if key else ""  # a problem across sections names its keys itself
            lines.append(f"  {where}{problem['msg'].removeprefix('Value error, ')}{shown}{_yaml_hint(problem)}")
    return "\n".join(lines)


# Which member of a union a value was checked as: pydantic puts that tag in the error's location, where the
# user wrote no such key (`prototype.teacher.local.path` is `prototype.teacher.path` in the YAML).
UNION_TAGS = {"teacher": {"local", "http"}, "check": {"choice", "regex", "json_schema", "python"}}


def _as_written(loc: tuple) -> tuple:
    """``loc`` without union tags: the key as the user wrote it."""
    return tuple(part for i, part in enumerate(loc) if not (i and part in UNION_TAGS.get(loc[i - 1], ())))


def _yaml_hint(problem: dict) -> str:
    """YAML turns unquoted yes/no/on/off into booleans, digits into numbers and 2024-01-01 into a date."""
    got = problem.get("input")
    if problem["type"] == "string_type" and isinstance(got, (bool, int, float, datetime.date)):
        return ("; text was expected: quote the value (YAML reads unquoted yes/no/on/off as booleans, digits as "
                "numbers and 2024-01-01 as a date)")
    return ""


def _did_you_mean(loc: tuple) -> str:
    """A close key of the section ``loc`` (pydantic's location, union tags included) points into, or the allowed ones."""
    model: type[BaseModel] = PipelineConfig
    parts = list(loc[:-1])
    while parts:
        part = parts.pop(0)
        field = model.model_fields.get(part) if isinstance(part, str) else None
        sections = _sections(field.annotation) if field else []
        if len(sections) > 1 and parts:  # a union: the next part is the tag of the member it was checked as
            tag = str(parts.pop(0)).replace("_", "")
            sections = [section for section in sections if section.__name__.lower().startswith(tag)]
        if not sections:
            return ""
        model = sections[0]  # an optional section (`LoraConfig | None`) suggests from its section type
    close = difflib.get_close_matches(str(loc[-1]), list(model.model_fields), n=1)
    return f"; did you mean '{close[0]}'?" if close else f"; allowed: {', '.join(model.model_fields)}"


def _sections(annotation) -> list[type[BaseModel]]:
    """The config sections an annotation allows, through Optional, unions and Annotated."""
    if isinstance(annotation, type):
        return [annotation] if issubclass(annotation, BaseModel) else []
    return [section for arg in typing.get_args(annotation) for section in _sections(arg)]
