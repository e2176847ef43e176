"""Stage 3, compress: turn the student into candidates (pruned or not, quantized one way or another), evaluate
each one reloaded from disk in a fresh process, and ship the smallest that meets the budget.
"""

import dataclasses
import json
import logging
import math
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from datasets import Dataset, load_from_disk

from distilflow.configs.schema import BudgetConfig, CandidateConfig, CompressConfig, HealConfig, PruneConfig
from distilflow.tasks import data, distill, journey, prune, quantize
from distilflow.tasks.artifacts import InArtifact, StageOutput
from distilflow.tasks.context import StageContext
from distilflow.tasks.distill import DistillOutput
from distilflow.tasks.errors import DistilflowError
from distilflow.tasks.evaluate import Evaluation
from distilflow.tasks.journey import JourneyEntry
from distilflow.tasks.models import load_model, save_model, size_on_disk
from distilflow.tasks.prototype import PrototypeOutput

log = logging.getLogger("distilflow")

# An NF4 checkpoint is deployable when its reload reproduces the in-memory model's perplexity this closely.
RELOAD_TOLERANCE = 0.01


@dataclass
class Candidate:
    """A compressed model, measured reloaded from disk: one row of candidates.json and of the Pareto chart."""

    candidate: str
    pruning: str | None
    scheme: str
    task_score: float
    task_score_ci: list[float]
    perplexity: float
    size_bytes: int
    params: int
    bits_per_param: float
    tokens_per_s: float
    quantize_s: float
    deployable: bool
    note: str = ""
    retention: float = 0.0  # its task score over the student's
    meets_budget: bool = False

    def journey_fields(self) -> dict:
        return {key: getattr(self, key) for key in journey.FIELDS}


@dataclass(kw_only=True)
class CompressOutput(StageOutput):
    """The chosen candidate, the candidates' table, and the journey's rows for what the student became."""

    model: InArtifact  # the chosen candidate's checkpoint
    candidates: InArtifact  # candidates.json: every candidate as measured, and the budget
    pareto: InArtifact  # pareto.png
    pruned_model: InArtifact | None  # the chosen candidate's pruned model, before quantization; None if not pruned
    pruned: JourneyEntry | None  # its row of the journey
    quantized: JourneyEntry  # the chosen candidate's row

    @property
    def journey(self) -> list[JourneyEntry]:
        return ([self.pruned] if self.pruned else []) + [self.quantized]


def run(cfg: CompressConfig, prototype: PrototypeOutput, distill: DistillOutput, ctx: StageContext) -> CompressOutput:
    out = ctx.out_dir
    # In memory: datasets would otherwise write its caches into the upstream artifact.
    dataset = load_from_disk(prototype.dataset, keep_in_memory=True)
    student_dir, student = distill.student, distill.last_phase

    prunings = {c.prune.label: c.prune for c in cfg.candidates if c.prune}
    pruned = {label: prune_student(pruning, student_dir, dataset, out / "pruned" / label, ctx)
              for label, pruning in prunings.items()}
    rows = [make_candidate(c, out / "pruned" / c.prune.label if c.prune else student_dir, dataset,
                           out / "candidates" / c.label, ctx) for c in cfg.candidates]
    for row in rows:
        row.retention = row.task_score / student.task_score if student.task_score else 0.0
        row.meets_budget = meets(row.size_bytes, row.retention, cfg.budget)
    chosen = choose(rows, cfg.budget)
    report(rows, chosen, student, cfg.budget, ctx)

    quantized = JourneyEntry("quantized", **chosen.journey_fields(), candidate=chosen.candidate, scheme=chosen.scheme,
                             note=chosen.note or None)
    ctx.tracker.log_metrics({f"quantized.{k}": v for k, v in {**chosen.journey_fields(),
                                                               "retention": chosen.retention}.items()})
    return CompressOutput(
        model=out / "candidates" / chosen.candidate, candidates=out / "candidates.json", pareto=out / "pareto.png",
        pruned_model=out / "pruned" / chosen.pruning if chosen.pruning else None,
        pruned=pruned[chosen.pruning] if chosen.pruning else None, quantized=quantized,
        summary=summary(rows, chosen, pruned, cfg.budget))


def report(rows: list[Candidate], chosen: Candidate, student: JourneyEntry, budget: BudgetConfig,
           ctx: StageContext) -> None:
    """The candidates' table (candidates.json), the Pareto chart and per-candidate metrics, tracked."""
    out = ctx.out_dir
    (out / "candidates.json").write_text(json.dumps({"student": student.as_json(), "budget": budget.model_dump(),
                                                     "chosen": chosen.candidate, "candidates": [asdict(r) for r in rows]},
                                                    indent=1))
    pareto_chart(rows, chosen, student, budget, out / "pareto.png")
    for name in ("candidates.json", "pareto.png"):
        ctx.tracker.log_artifact(out / name)
    for row in rows:
        ctx.tracker.log_metrics({f"candidate.{row.candidate}.{k}": v for k, v in asdict(row).items()
                                 if k in (*journey.FIELDS, "retention", "quantize_s")})
    ctx.tracker.set_tags({"distilflow.chosen_candidate": chosen.candidate})


def prune_student(cfg: PruneConfig, student_dir: Path, dataset: Dataset, out_dir: Path,
                  ctx: StageContext) -> JourneyEntry:
    """Prune the student as ``cfg`` says, heal it, save it to ``out_dir`` and evaluate it: its journey entry.

    The importance scores go beside it, as JSON and as a plot.
    """
    start = time.perf_counter()
    student, tokenizer = load_model(student_dir, ctx.device)
    batches = data.token_batches(tokenizer, data.calibration_texts(tokenizer, dataset, cfg.calibration_samples),
                                 ctx.device)
    pruned, scores = prune.prune(student, batches, cfg)  # a copy: the student stays, the heal's teacher
    if cfg.heal:
        pruned = heal(pruned, student, tokenizer, dataset, cfg.heal, ctx, name=out_dir.name)
    del student
    save_model(pruned, tokenizer, out_dir)
    seconds = time.perf_counter() - start

    scores_path = out_dir.with_name(f"{out_dir.name}-importance.json")
    scores_path.write_text(json.dumps(scores, indent=1))
    plot = prune.plot_importance(scores, out_dir.with_name(f"{out_dir.name}-importance.png"))
    for path in (scores_path, plot):
        ctx.tracker.log_artifact(path, "pruning")

    evaluation = ctx.evaluator.in_fresh_process(out_dir)
    ctx.tracker.log_metrics({f"pruned.{out_dir.name}.{k}": v for k, v in evaluation.metrics.items()})
    log.info("pruned %s in %.0f s: task score %.3f", out_dir.name, seconds, evaluation.metrics["task_score"])
    return evaluation.journey_entry("pruned", pruning=out_dir.name, prune_s=seconds,
                                    kept_layers=scores.get("kept_layers"))


def heal(model, before_pruning, tokenizer, dataset: Dataset, cfg: HealConfig, ctx: StageContext, name: str):
    """A short KD run that recovers what pruning lost: the pruned model learns the token distributions
    of the model it was cut from, on the teacher's kept answers.

    The distill stage's logit KD, reused (not copied). Its checkpoints go to their own directory, so a
    resumed run never mixes two prunings, and its training steps to a child run of their own (phase `heal`).
    """
    with ctx.tracker.child(f"heal-{name}") as tracker:
        tracker.set_tags({"distilflow.stage": "compress", "distilflow.phase": "heal"})
        healing = dataclasses.replace(ctx, checkpoint_dir=ctx.checkpoint_dir / f"heal-{name}", tracker=tracker)
        return distill.logit_kd(model, tokenizer, dataset, cfg, healing, teacher=before_pruning)


def make_candidate(candidate: CandidateConfig, source_dir: Path, dataset: Dataset, out_dir: Path,
                   ctx: StageContext) -> Candidate:
    """Quantize the model in ``source_dir`` as ``candidate`` says into ``out_dir``, and evaluate it from disk.

    NF4 is measured in memory (bitsandbytes' own numbers) and is deployable only if the saved checkpoint,
    reloaded in a fresh process, reproduces them.
    """
    cfg = candidate.quantize
    start = time.perf_counter()
    if cfg.scheme == "nf4":
        evaluation, seconds, (deployable, note) = nf4_measured(source_dir, out_dir, ctx)
    else:
        if cfg.scheme == "bf16":
            shutil.copytree(source_dir, out_dir)
        else:
            model, tokenizer = load_model(source_dir, ctx.device)
            texts = data.calibration_texts(tokenizer, dataset, cfg.calibration_samples)
            quantize.quantize(model, tokenizer, cfg, texts, out_dir)
            del model
        seconds = time.perf_counter() - start
        evaluation = ctx.evaluator.in_fresh_process(out_dir)
        deployable, note = True, ""
        if cfg.scheme == "fp8" and not quantize.fp8_native(ctx.device):
            note = (f"evaluated emulated: {ctx.device.type} has no FP8 kernels, so the weights ran dequantized; "
                    "its score holds, its speed is not FP8's")
            log.warning("candidate %s: %s", candidate.label, note)
    log.info("candidate %s: task score %.3f, %.1f MB", candidate.label, evaluation.metrics["task_score"],
             evaluation.metrics["size_bytes"] / 1e6)
    return Candidate(candidate=candidate.label, pruning=candidate.prune.label if candidate.prune else None,
                     scheme=cfg.label, **{k: evaluation.metrics[k] for k in journey.FIELDS}, quantize_s=seconds,
                     deployable=deployable, note=note)


def nf4_measured(source_dir: Path, out_dir: Path, ctx: StageContext) -> tuple[Evaluation, float, tuple[bool, str]]:
    """NF4 evaluated in memory, its quantization time, and whether its saved checkpoint is deployable."""
    start = time.perf_counter()
    model, tokenizer = quantize.nf4(source_dir, ctx.device, out_dir)
    seconds = time.perf_counter() - start
    evaluation = ctx.evaluator.model(model, tokenizer, desc="nf4 eval")
    evaluation.add_size(size_on_disk(out_dir))
    del model
    try:
        reloaded = ctx.evaluator.in_fresh_process(out_dir)
    except DistilflowError as err:
        return evaluation, seconds, (False, f"the saved checkpoint does not reload: {str(err).splitlines()[-1]}")
    return evaluation, seconds, reload_verdict(evaluation, reloaded)


def reload_verdict(in_memory: Evaluation, reloaded: Evaluation) -> tuple[bool, str]:
    """Whether a checkpoint reloaded in a fresh process scores what the in-memory model scored (deployable)."""
    before, after = in_memory.metrics["perplexity"], reloaded.metrics["perplexity"]
    if math.isclose(before, after, rel_tol=RELOAD_TOLERANCE):
        return True, ""
    return False, f"the saved checkpoint reloads broken (perplexity {after:.4g}, in memory {before:.4g})"


def meets(size_bytes: int, retention: float, budget: BudgetConfig) -> bool:
    return ((budget.max_size_bytes is None or size_bytes <= budget.max_size_bytes)
            and (budget.min_retention is None or retention >= budget.min_retention))


def choose(rows: list[Candidate], budget: BudgetConfig) -> Candidate:
    """The smallest deployable candidate that meets the budget (the better score breaks a tie)."""
    eligible = [row for row in rows if row.deployable and row.meets_budget]
    if not eligible:
        raise DistilflowError(f"compress.budget ({_describe(budget)}): no deployable candidate meets it; "
                              f"relax the budget or add candidates.\n{candidate_table(rows)}")
    return min(eligible, key=lambda row: (row.size_bytes, -row.task_score))


def _describe(budget: BudgetConfig) -> str:
    parts = ([f"max_size_bytes {budget.max_size_bytes:,}"] if budget.max_size_bytes else []) + \
            ([f"min_retention {budget.min_retention:g}"] if budget.min_retention else [])
    return ", ".join(parts) or "none"


def candidate_table(rows: list[Candidate], chosen: Candidate | None = None) -> str:
    """The candidates as a markdown table (it reads as plain text in a terminal too)."""
    lines = ["| candidate | pruning | scheme | task score | retention | perplexity | size (MB) | bits/param | "
             "quantize (s) | deployable | meets budget |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for row in rows:
        name = f"**{row.candidate}** (chosen)" if chosen and row is chosen else row.candidate
        deployable = ("yes" + (f" ({row.note})" if row.note else "")) if row.deployable else f"no: {row.note}"
        lines.append(f"| {name} | {row.pruning or '–'} | {row.scheme} | {row.task_score:.3f} | "
                     f"{row.retention:.2f} | {row.perplexity:.1f} | {row.size_bytes / 1e6:.1f} | "
                     f"{row.bits_per_param:.2f} | {row.quantize_s:.0f} | {deployable} | "
                     f"{'yes' if row.meets_budget else 'no'} |")
    return "\n".join(lines)


def summary(rows: list[Candidate], chosen: Candidate, pruned: dict[str, JourneyEntry], budget: BudgetConfig) -> str:
    lines = [f"## Compression: {chosen.candidate} chosen", "",
             f"The smallest deployable candidate meeting the budget ({_describe(budget)}); retention is "
             "the task score over the student's.", "", candidate_table(rows, chosen)]
    if pruned:
        lines += ["", "| pruned model (before quantization) | task score | perplexity | params (M) | size (MB) |",
                  "|---|---|---|---|---|"]
        lines += [f"| {label} | {e.task_score:.3f} | {e.perplexity:.1f} | {e.params / 1e6:.1f} | "
                  f"{e.size_bytes / 1e6:.1f} |" for label, e in pruned.items()]
    return "\n".join(lines) + "\n"


def pareto_chart(rows: list[Candidate], chosen: Candidate, student: JourneyEntry, budget: BudgetConfig,
                 path: Path) -> Path:
    """Task score against size for every candidate, the Pareto front joined, the budget shaded out."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    figure, axis = plt.subplots(figsize=(8, 5.5))
    for row in rows:
        marker = "o" if row.deployable else "x"
        color = "tab:green" if row is chosen else "tab:blue" if row.pruning is None else "tab:orange"
        axis.scatter(row.size_bytes / 1e6, row.task_score, marker=marker, color=color, s=60, zorder=3)
        axis.annotate(row.candidate, (row.size_bytes / 1e6, row.task_score), fontsize=8,
                      xytext=(4, 4), textcoords="offset points")
    front = pareto_front(rows)
    axis.plot([r.size_bytes / 1e6 for r in front], [r.task_score for r in front], color="grey",
              linestyle="--", zorder=2, label="Pareto front")
    axis.axhline(student.task_score, color="black", linewidth=0.8, label=f"student ({student.size_bytes / 1e6:.1f} MB)")
    if budget.min_retention:
        axis.axhspan(0, budget.min_retention * student.task_score, color="red", alpha=0.08,
                     label="below min_retention")
    if budget.max_size_bytes:
        axis.axvspan(budget.max_size_bytes / 1e6, max(r.size_bytes for r in rows) / 1e6 * 1.1, color="red",
                     alpha=0.08, label="above max_size_bytes")
    axis.set(xlabel="size on disk (MB)", ylabel="task score",
             title="Compression candidates (green: chosen, orange: pruned, x: not deployable)")
    axis.legend(loc="lower right", fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path


def pareto_front(rows: list[Candidate]) -> list[Candidate]:
    """The candidates no other candidate beats on both size and task score, smallest first."""
    front, best = [], -math.inf
    for row in sorted(rows, key=lambda r: (r.size_bytes, -r.task_score)):
        if row.task_score > best:
            front.append(row)
            best = row.task_score
    return front
