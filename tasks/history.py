"""Where finished runs are recorded, so `distilflow report --latest` finds the newest one."""

import json
import logging
import os
from pathlib import Path

from distilflow.tasks.artifacts import check_writable, published
from distilflow.tasks.errors import DistilflowError

log = logging.getLogger("distilflow")

INDEX = "history.jsonl"


def distilflow_home() -> Path:
    """$DISTILFLOW_HOME, default ~/.distilflow: holds the index of finished runs."""
    configured = os.environ.get("DISTILFLOW_HOME") or "~/.distilflow"
    home = Path(os.path.expandvars(configured)).expanduser()
    if "$" in str(home) or str(home).startswith("~"):
        raise DistilflowError(f"DISTILFLOW_HOME={configured!r} names a variable or user that is not set; "
                              "set DISTILFLOW_HOME to a directory path")
    return home.resolve()


def check_home(home: Path) -> None:
    """The run's record is written at its end: an unusable home fails the run before it starts, not after."""
    check_writable(home, "DISTILFLOW_HOME", "it holds the index of finished runs")


def record_run(workdir: Path, record: dict, home: Path) -> Path:
    """Write the run's record to WORKDIR/runs/RUN_ID.json and append it to the index in ``home``."""
    path = workdir / "runs" / f"{record['run_id']}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    with published(path) as partial:
        partial.write_text(json.dumps(record, indent=1))
    home.mkdir(parents=True, exist_ok=True)
    line = json.dumps({"run_id": record["run_id"], "record": str(path.resolve())}) + "\n"
    with open(home / INDEX, "a+b") as index:
        # A line cut short by a crash or a full disk stays one bad line: the next one starts on its own.
        index.write(("" if _ends_a_line(index) else "\n").encode() + line.encode())
    return path


def _ends_a_line(index) -> bool:
    """Whether the file is empty or ends with a newline."""
    if index.seek(0, os.SEEK_END) == 0:
        return True
    index.seek(-1, os.SEEK_END)
    return index.read(1) == b"\n"


def latest_run(home: Path) -> dict:
    """The record of the newest finished run; unreadable index lines are skipped, with a warning."""
    index = home / INDEX
    try:
        lines = index.read_bytes().decode("utf-8", errors="replace").splitlines() if index.is_file() else []
    except OSError as err:
        raise DistilflowError(f"{index}: cannot read the index of finished runs ({err.strerror})") from None
    entries = [entry for entry in map(_entry, lines) if entry is not None]
    if len(entries) < len([line for line in lines if line.strip()]):
        log.warning("%s: skipped %d unreadable line(s) (cut short by a crash or a full disk?)", index,
                    len([line for line in lines if line.strip()]) - len(entries))
    if not entries:
        raise DistilflowError(f"no finished run recorded in {index}; run `distilflow run CONFIG.yaml` first")
    record = Path(entries[-1]["record"])
    try:
        data = json.loads(record.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise DistilflowError(f"the latest run's record {record} is gone (workdir deleted?)") from None
    except (OSError, ValueError, RecursionError) as err:
        raise DistilflowError(f"the latest run's record {record} is unreadable ({err}); re-run the pipeline, "
                              "or delete that file and its line in " + str(index)) from None
    if not isinstance(data, dict) or not {"run_id", "journey", "bundle"} <= data.keys():
        raise DistilflowError(f"the latest run's record {record} is not a distilflow run record")
    return data


def _entry(line: str) -> dict | None:
    try:
        entry = json.loads(line)
    except (ValueError, RecursionError):
        return None
    return entry if isinstance(entry, dict) and isinstance(entry.get("record"), str) else None
