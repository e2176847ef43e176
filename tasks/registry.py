"""The MLflow model registry and the deploy gate: a new version becomes `champion` only if it passes.

Every pipeline run registers its bundle as a version of ``deploy.model_name`` (a cached re-run finds
the version it registered before). The gate (``deploy.gate``) then decides the aliases: pass, and
`champion` moves to the new version while the old champion keeps `previous`; fail, and the new
version gets `candidate` only. MLflow client calls only, so this imports without Prefect.
"""

import hashlib
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

from distilflow.configs.schema import GateConfig, PipelineConfig
from distilflow.tasks import journey
from distilflow.tasks.artifacts import manifest_digest
from distilflow.tasks.errors import DistilflowError
from distilflow.tasks.journey import JourneyEntry

CHAMPION, PREVIOUS, CANDIDATE = "champion", "previous", "candidate"
SCORE_TAG = "journey.deployed.task_score"


class GateFailed(DistilflowError):
    """The new model did not pass deploy.gate: it is registered with alias `candidate`, `champion` stays."""

    exit_code = 3  # the run worked; its model is not good enough: a scheduler should tell the two apart


@dataclass(frozen=True)
class GateCheck:
    """One check of the deploy gate: its config key, whether the new model passed it, and the numbers compared."""

    key: str
    passed: bool
    detail: str


@dataclass
class Release:
    model_name: str
    version: str
    checks: list[GateCheck]
    champion: str | None  # the champion's version after this release
    aliases: list[str] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return all(check.passed for check in self.checks)

    def failure(self) -> str:
        reasons = self.reasons()
        kept = f"version {self.champion}" if self.champion else "no version"
        return (f"{self.model_name} version {self.version} failed the deploy gate ({reasons}); `{CHAMPION}` "
                f"stays on {kept}, the new version has alias `{CANDIDATE}`. Improve the model or change deploy.gate.")

    def summary(self) -> str:
        """One line: the gate's verdict, and which version to ship."""
        if self.passed:
            return f"Deploy gate passed: {self.model_name} version {self.version} is `{CHAMPION}`."
        return (f"Deploy gate FAILED ({self.reasons()}): this run's bundle is not the one to ship; `{CHAMPION}` is "
                f"{f'version {self.champion}' if self.champion else 'no version yet'}.")

    def reasons(self) -> str:
        return "; ".join(f"{c.key}: {c.detail}" for c in self.checks if not c.passed)

    def markdown(self) -> str:
        verdict = "passed" if self.passed else "FAILED"
        lines = [f"# Deploy gate {verdict}: {self.model_name} version {self.version}", "",
                 f"Aliases of the new version: {', '.join(f'`{a}`' for a in self.aliases) or 'none'}; "
                 f"`{CHAMPION}` is version {self.champion or '(none)'}.", "",
                 "| check | result | detail |", "|---|---|---|"]
        lines += [f"| `{c.key}` | {'pass' if c.passed else 'FAIL'} | {c.detail} |" for c in self.checks]
        if not self.checks:
            lines.append("| (none configured) | pass | |")
        return "\n".join(lines) + "\n"

    def as_dict(self) -> dict:
        return {**asdict(self), "passed": self.passed}


def gate_checks(gate: GateConfig, states: list[JourneyEntry], champion_score: float | None) -> list[GateCheck]:
    """The configured checks of ``gate`` on the journey's `deployed` entry (``None`` limits are skipped).

    ``champion_score`` is the current champion's task score (``None``: no champion to compare with).
    """
    deployed, teacher = journey.find(states, "deployed"), journey.find(states, "teacher")
    score = deployed.task_score
    checks = []
    if gate.min_task_score is not None:
        checks.append(_at_least("deploy.gate.min_task_score", "task score", score, gate.min_task_score))
    if gate.min_retention is not None:
        if teacher and teacher.task_score > 0:
            checks.append(_at_least("deploy.gate.min_retention", "retention", score / teacher.task_score,
                                    gate.min_retention))
        else:
            checks.append(GateCheck("deploy.gate.min_retention", False, "no teacher score above 0 to retain"))
    if gate.max_size_mb is not None:
        checks.append(_at_most("deploy.gate.max_size_mb", "size (MB)", deployed.size_bytes / 1e6, gate.max_size_mb))
    if gate.max_latency_s is not None:
        checks.append(_at_most("deploy.gate.max_latency_s", "smoke-test latency (s)", deployed.smoke_latency_s,
                               gate.max_latency_s))
    engine_score = (deployed.serving or {}).get("task_score")
    if gate.max_engine_gap is not None and engine_score is not None:
        checks.append(engine_parity(gate.max_engine_gap, deployed))
    if gate.max_regression is not None and champion_score is not None:
        checks.append(regression_check(deployed, champion_score, gate.max_regression))
    if gate.min_margin_over_baseline is not None:
        checks.append(margin_over_baseline(deployed, journey.pool_baseline(states), gate.min_margin_over_baseline))
    return checks


def margin_over_baseline(deployed: JourneyEntry, baseline: JourneyEntry | None, margin: float) -> GateCheck:
    """The deployed model against the TF-IDF baseline trained on the labelled pool: what the LLM route must beat."""
    key = "deploy.gate.min_margin_over_baseline"
    if baseline is None:
        return GateCheck(key, False, "no baseline in the journey to compare with (prototype.baseline)")
    gap = deployed.task_score - baseline.task_score
    passed = gap >= margin or math.isclose(gap, margin)
    return GateCheck(key, passed, f"task score {deployed.task_score:.3f} vs the baseline's {baseline.task_score:.3f} "
                                  f"({baseline.label}): margin {gap:+.3f} {'>=' if passed else '<'} {margin:+.3f}")


def engine_parity(max_gap: float | str, deployed: JourneyEntry) -> GateCheck:
    """The deployed artifact's task score in its serving engine against the HF evaluator's. ``auto``
    allows 2 held-out items or 0.02, whichever is larger."""
    served = deployed.serving
    gap = abs(served["task_score"] - deployed.task_score)
    limit = max(2 / served["task_requests"], 0.02) if max_gap == "auto" else max_gap
    passed = gap <= limit or math.isclose(gap, limit)  # scores are k/n: 0.925 - 0.9 is a hair above 0.025
    return GateCheck("deploy.gate.max_engine_gap", passed,
                 f"task score {served['task_score']:.3f} in {served['engine']} ({served['artifact']}) vs "
                 f"{deployed.task_score:.3f} in the HF evaluator: gap {gap:.3f} {'<=' if passed else '>'} "
                 f"{limit:.3f}")


def regression_check(deployed: JourneyEntry, champion_score: float, max_regression: float) -> GateCheck:
    """Did the new model score below the champion by more than ``max_regression`` plus the held-out split's
    noise? It fails only when even the top of its 95% confidence interval is below the champion's score minus
    ``max_regression``: a drop the held-out split cannot tell from chance does not block."""
    score, interval = deployed.task_score, deployed.task_score_ci
    top = interval[1] if interval else score  # a journey from before intervals: the score alone
    limit = champion_score - max_regression
    passed = top >= limit
    measured = f"task score {score:.3f} (95% CI {interval[0]:.3f}–{interval[1]:.3f}), top of its interval " \
        f"{top:.3f}" if interval else f"task score {score:.3f}"
    return GateCheck("deploy.gate.max_regression", passed,
                 f"{measured} {'>=' if passed else '<'} {limit:.3f} (champion's {champion_score:.3f} "
                 f"- max_regression {max_regression:g})" + ("" if passed else ": a drop beyond the noise"))


def _at_least(key: str, what: str, value: float, limit: float) -> GateCheck:
    return GateCheck(key, value >= limit, f"{what} {value:.3f} {'>=' if value >= limit else '<'} {limit:.3f}")


def _at_most(key: str, what: str, value: float, limit: float) -> GateCheck:
    return GateCheck(key, value <= limit, f"{what} {value:.3f} {'<=' if value <= limit else '>'} {limit:.3f}")


def release(cfg: PipelineConfig, bundle: Path, tracking_uri: str, mlflow_run_id: str, flow_run_id: str) -> Release:
    """Register ``bundle`` as a version of ``deploy.model_name`` and move the aliases by the gate's verdict."""
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri)
    name = cfg.deploy.model_name
    states = journey.read(bundle)
    champion = alias_version(client, name, CHAMPION)
    version = str(register(client, name, bundle, mlflow_run_id, version_tags(cfg, states, flow_run_id)).version)
    # MLflow hands versions back as int or str depending on the call: compare them as strings.
    replaced = str(champion.version) if champion is not None and str(champion.version) != version else None
    champion_score = float(champion.tags[SCORE_TAG]) if replaced and SCORE_TAG in champion.tags else None
    outcome = Release(name, version, gate_checks(cfg.deploy.gate, states, champion_score),
                      champion=str(champion.version) if champion else None)

    if outcome.passed:
        if replaced:
            client.set_registered_model_alias(name, PREVIOUS, replaced)
        client.set_registered_model_alias(name, CHAMPION, version)
        outcome.champion = version
    else:
        client.set_registered_model_alias(name, CANDIDATE, version)
    # list(): over a tracking server, MLflow returns the aliases as a protobuf container, which JSON cannot write
    outcome.aliases = list(client.get_model_version(name, version).aliases)
    verdict = "passed" if outcome.passed else "failed"
    client.set_model_version_tag(name, version, "distilflow.gate", verdict)
    client.set_tag(mlflow_run_id, "distilflow.gate", verdict)
    client.set_tag(mlflow_run_id, "distilflow.model_version", f"{name}/{version}")
    return outcome


def register(client, name: str, bundle: Path, run_id: str, tags: dict[str, str]):
    """The bundle as a model version: logged under the run's artifacts at ``bundle/``, tagged with its
    manifest digest; a bundle registered before (a cached re-run) returns its existing version."""
    from mlflow.exceptions import MlflowException

    digest = manifest_digest(bundle)
    try:
        client.create_registered_model(name, description="Models distilled by distilflow; "
                                                          f"`{CHAMPION}` is the one to serve.")
    except MlflowException as err:
        if err.error_code != "RESOURCE_ALREADY_EXISTS":
            raise
    found = client.search_model_versions(f"name = '{name}' and tags.`distilflow.bundle_digest` = '{digest}'")
    if found:
        return found[0]
    client.log_artifacts(run_id, str(bundle), "bundle")
    return client.create_model_version(name, source=f"runs:/{run_id}/bundle", run_id=run_id,
                                       tags={**tags, "distilflow.bundle_digest": digest},
                                       description=f"distilflow bundle {bundle}")


def alias_version(client, name: str, alias: str):
    """The version that ``alias`` points to, or None (no such model or alias yet)."""
    from mlflow.exceptions import MlflowException

    try:
        return client.get_model_version_by_alias(name, alias)
    except MlflowException as err:
        if err.error_code in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE"):
            return None
        raise


def version_tags(cfg: PipelineConfig, states: list[JourneyEntry], flow_run_id: str) -> dict[str, str]:
    """What a version is, at a glance in the registry: its journey numbers, teacher, config and run."""
    shown = [e for e in (journey.find(states, "teacher"), journey.pool_baseline(states), journey.find(states, "deployed"))
             if e]
    numbers = {f"journey.{e.key}.{k}": str(v) for e in shown
               for k, v in e.as_json().items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
    return {**numbers, "teacher": cfg.prototype.teacher.label, "config_hash": config_hash(cfg),
            "prefect.flow_run_id": flow_run_id}


def config_hash(cfg: PipelineConfig) -> str:
    return hashlib.sha256(cfg.model_dump_json().encode()).hexdigest()[:16]
