"""Reads a YAML config, applies `--set` overrides and validates it, with errors that name key and file."""

import difflib
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
    path = Path(path).resolve()
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
    """``["distill.lora.r=16"]`` -> ``{"distill.lora.r": 16}``; values are read as YAML scalars."""
    overrides = {}
    for assignment in assignments:
        key, sep, value = assignment.partition("=")
        if not sep or not key.strip():
            raise DistilflowError(f"--set {assignment!r}: expected KEY=VALUE, e.g. --set distill.lora.r=16")
        overrides[key.strip()] = yaml.safe_load(value) if value else ""
    return overrides


def _read_yaml(path: Path) -> dict:
    if not path.is_file():
        raise DistilflowError(f"config file not found: {path}")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        where = getattr(err, "problem_mark", None)
        line = f" line {where.line + 1}, column {where.column + 1}" if where else ""
        raise DistilflowError(f"{path}:{line}: not valid YAML ({getattr(err, 'problem', err)})") from None
    if not isinstance(data, dict):
        raise DistilflowError(f"{path}: expected a mapping of config sections (run, task, prototype, ...)")
    return data


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
        key = ".".join(str(part) for part in problem["loc"])
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
            lines.append(f"  {where}{problem['msg'].removeprefix('Value error, ')}{shown}")
    return "\n".join(lines)


def _did_you_mean(loc: tuple) -> str:
    model: type[BaseModel] = PipelineConfig
    for part in loc[:-1]:
        field = model.model_fields.get(str(part)) if isinstance(part, str) else None
        # An optional section (`LoraAdapters | None`) suggests from its section type.
        candidates = typing.get_args(field.annotation) or (field.annotation,) if field else ()
        sections = [c for c in candidates if isinstance(c, type) and issubclass(c, BaseModel)]
        if not sections:
            return ""
        model = sections[0]
    close = difflib.get_close_matches(str(loc[-1]), list(model.model_fields), n=1)
    return f"; did you mean '{close[0]}'?" if close else f"; allowed: {', '.join(model.model_fields)}"
