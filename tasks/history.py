"""Where finished runs are recorded, so `distilflow report --latest` finds the newest one."""

import json
import os
from pathlib import Path

from distilflow.tasks.artifacts import published
from distilflow.tasks.errors import DistilflowError


def distilflow_home() -> Path:
    """$DISTILFLOW_HOME, default ~/.distilflow: holds the index of finished runs."""
    return Path(os.environ.get("DISTILFLOW_HOME", "~/.distilflow")).expanduser()


def record_run(workdir: Path, record: dict, home: Path) -> Path:
    """Write the run's record to WORKDIR/runs/RUN_ID.json and append it to the index in ``home``."""
    path = workdir / "runs" / f"{record['run_id']}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    with published(path) as partial:
        partial.write_text(json.dumps(record, indent=1))
    home.mkdir(parents=True, exist_ok=True)
    with open(home / "history.jsonl", "a") as index:
        index.write(json.dumps({"run_id": record["run_id"], "record": str(path.resolve())}) + "\n")
    return path


def latest_run(home: Path) -> dict:
    index = home / "history.jsonl"
    lines = index.read_text().splitlines() if index.is_file() else []
    if not lines:
        raise DistilflowError(f"no finished run recorded in {index}; run `distilflow run CONFIG.yaml` first")
    record = Path(json.loads(lines[-1])["record"])
    if not record.is_file():
        raise DistilflowError(f"the latest run's record {record} is gone (workdir deleted?)")
    return json.loads(record.read_text())
