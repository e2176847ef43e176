"""The journey: one row per model state (teacher, student per phase, pruned, quantized, deployed), each measured by
the same evaluator, and how each serves. The stages add their rows; deploy measures them served and writes them to
the bundle's journey.json, which the registry's gate, the run's record and `distilflow report` read back.
"""

import json
from dataclasses import asdict, dataclass, fields
from pathlib import Path

# What the evaluator measures of every state; a field a state cannot be measured by (a black-box teacher has no
# weights to size) is None, and still written.
FIELDS = ("task_score", "task_score_ci", "perplexity", "size_bytes", "params", "bits_per_param", "tokens_per_s")
FILE = "journey.json"
POOL = "labelled pool"  # what the baseline a user tries first is trained on (JourneyEntry.trained_on)


@dataclass
class JourneyEntry:
    """One model state's row. Besides the evaluator's numbers (``FIELDS``), each state has its own details, None
    (and not written) where they do not apply; deploy adds ``serving`` and ``cost_usd_per_mtok`` to every row."""

    state: str  # teacher, teacher-gguf, student, pruned, quantized, deployed
    task_score: float | None = None
    task_score_ci: list[float] | None = None  # [low, high], 95%
    perplexity: float | None = None
    size_bytes: int | None = None
    params: int | None = None
    bits_per_param: float | None = None
    tokens_per_s: float | None = None
    phase: str | None = None  # student: the distill phase it was measured after
    pruning: str | None = None  # pruned: which pruning (compress.candidates[].prune's label)
    prune_s: float | None = None
    kept_layers: list[int] | None = None
    candidate: str | None = None  # quantized: the chosen compression candidate and its scheme
    scheme: str | None = None
    note: str | None = None
    trained_on: str | None = None  # baseline: the labels it learned from (POOL, "distillation labels")
    smoke_pass_rate: float | None = None  # deployed: the smoke tests, transformers and GGUF
    smoke_latency_s: float | None = None
    gguf_file: str | None = None
    gguf_size_bytes: int | None = None
    gguf_smoke_pass_rate: float | None = None
    serving: dict | None = None  # tasks/serving.py: its engine's measurements, or why it was not served
    cost_usd_per_mtok: dict | None = None
    cost_usd_per_1k_requests: dict | None = None  # a task request as its clients send it: prompt and answer

    @property
    def label(self) -> str:
        """The state, and its phase (or what a baseline was trained on) where it has one: "student (sft)"."""
        detail = self.phase or self.trained_on
        return f"{self.state} ({detail})" if detail else self.state

    @property
    def key(self) -> str:
        """The row's name in metric keys: "student.sft", "baseline.labelled_pool", "deployed"."""
        detail = self.phase or self.trained_on
        return f"{self.state}.{detail.replace(' ', '_')}" if detail else self.state

    def as_json(self) -> dict:
        """The row as journey.json holds it: the evaluator's fields always, the others where they apply."""
        row = asdict(self)
        return {key: value for key, value in row.items() if key == "state" or key in FIELDS or value is not None}

    @classmethod
    def from_json(cls, row: dict) -> "JourneyEntry":
        known = {field.name for field in fields(cls)}
        return cls(**{key: value for key, value in row.items() if key in known})


def find(journey: list[JourneyEntry], state: str) -> JourneyEntry | None:
    """The first row of ``state``, or None."""
    return next((entry for entry in journey if entry.state == state), None)


def pool_baseline(journey: list[JourneyEntry]) -> JourneyEntry | None:
    """The baseline trained on the labelled pool: what a user tries first, the bar deploy.gate's margin is over."""
    return next((e for e in journey if e.state == "baseline" and e.trained_on == POOL), None)


def to_json(journey: list[JourneyEntry]) -> list[dict]:
    return [entry.as_json() for entry in journey]


def from_json(rows: list[dict]) -> list[JourneyEntry]:
    return [JourneyEntry.from_json(row) for row in rows]


def write(journey: list[JourneyEntry], directory: Path) -> Path:
    path = directory / FILE
    path.write_text(json.dumps(to_json(journey), indent=1))
    return path


def read(directory: Path) -> list[JourneyEntry]:
    """The journey of a bundle (``directory``), as deploy wrote it."""
    return from_json(json.loads((directory / FILE).read_text()))


def table(journey: list[JourneyEntry]) -> str:
    """The journey as markdown tables (they read as plain text in a terminal too): what the evaluator
    measured of each state, then how each state serves (where any was served)."""
    teacher = find(journey, "teacher")
    bar = teacher.task_score if teacher else None
    lines = ["| state | task score | 95% CI | retention | perplexity | size (MB) | params (M) | bits/param |",
             "|---|---|---|---|---|---|---|---|"]
    for e in journey:
        if e.task_score is None:
            continue  # a served artifact only (the teacher's own GGUF file): in the serving table
        retention = e.task_score / bar if bar else None
        cells = [_cell(e.task_score, ".3f"), _interval(e.task_score_ci), _cell(retention, ".2f"),
                 _cell(e.perplexity, ".1f"), _cell(e.size_bytes, ".1f", scale=1e-6), _cell(e.params, ".1f", scale=1e-6),
                 _cell(e.bits_per_param, ".2f")]
        lines.append(f"| {e.label} | {' | '.join(cells)} |")
    if any(e.serving or e.cost_usd_per_mtok or e.cost_usd_per_1k_requests for e in journey):
        lines += ["", serving_table(journey)]
    return "\n".join(lines)


def serving_table(journey: list[JourneyEntry]) -> str:
    """Each state as its serving engine served it: speed, latency, memory, engine task score and cost."""
    concurrency = next((e.serving["concurrency"] for e in journey if (e.serving or {}).get("concurrency")), "N")
    lines = [f"| state | engine | artifact | size (MB) | tokens/s batch 1 | TTFT (s) | latency p50 / p95 (s) | "
             f"tokens/s at {concurrency} | peak memory (MB) | engine task score | $/1M tokens batch 1 | "
             f"$/1M tokens at {concurrency} | $/1k requests batch 1 | $/1k requests at {concurrency} |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for e in journey:
        served, cost, requests = e.serving or {}, e.cost_usd_per_mtok or {}, e.cost_usd_per_1k_requests or {}
        if served.get("not_measured"):
            price = f" | {_cell(cost.get('batch1'), '.3g')} | {_cell(cost.get('throughput'), '.3g')}" if any(cost.values()) \
                else " | – | –"
            lines.append(f"| {e.label} | {served.get('engine') or '–'} | not served: {served['not_measured']} | "
                         f"– | – | – | – | – | – | –{price} | – | – |")
            continue
        latency = f"{_cell(served.get('latency_p50_s'), '.3f')} / {_cell(served.get('latency_p95_s'), '.3f')}"
        cells = [served.get("engine") or "–", served.get("artifact") or "–",
                 _cell(served.get("artifact_bytes"), ".1f", scale=1e-6), _cell(served.get("batch1_tokens_per_s"), ".1f"),
                 _cell(served.get("ttft_s"), ".3f"), latency, _cell(served.get("throughput_tokens_per_s"), ".1f"),
                 _cell(served.get("peak_memory_mb"), ".0f"), _cell(served.get("task_score"), ".3f"),
                 _cell(cost.get("batch1"), ".3g"), _cell(cost.get("throughput"), ".3g"),
                 _cell(requests.get("batch1"), ".3g"), _cell(requests.get("throughput"), ".3g")]
        lines.append(f"| {e.label} | {' | '.join(cells)} |")
    return "\n".join(lines)


def _interval(bounds: list[float] | None) -> str:
    return "–" if bounds is None else f"{bounds[0]:.3f}–{bounds[1]:.3f}"


def _cell(value, spec: str, scale: float = 1.0) -> str:
    """A number in the table; "–" where the state has none (e.g. the size of a black-box teacher)."""
    return "–" if value is None else format(value * scale, spec)
