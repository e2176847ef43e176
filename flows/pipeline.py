"""The distilflow pipeline as Prefect flows: prototype -> distill -> compress -> deploy.

One parent flow run per pipeline run and one child flow run per stage (each with its logs in the
Prefect UI); one MLflow parent run with a nested run per stage. The work itself is in tasks/.
Stages and MLflow calls are tasks that retry transient failures (`run.retries`); nothing else retries.
"""

import logging
import signal
from pathlib import Path
from typing import Any
from uuid import UUID

from prefect import flow, get_client, get_run_logger, task
from prefect.deployments import run_deployment
from prefect.deployments.runner import EntrypointType
from prefect.artifacts import create_link_artifact, create_markdown_artifact
from prefect.cache_policies import NO_CACHE
from prefect._internal import control_listener
from prefect.exceptions import ObjectNotFound, TerminationSignal
from prefect.states import Crashed
from prefect.logging.handlers import APILogHandler
from prefect.runtime import deployment, flow_run

from distilflow.configs.loader import load_config
from distilflow.configs.schema import PipelineConfig
from distilflow.flows.retries import retried, retry_if_transient
from distilflow.tasks import artifacts, history, registry, tracking
from distilflow.tasks.artifact_store import open_store
from distilflow.tasks.artifacts import StageOutput
from distilflow.tasks.errors import DistilflowError
from distilflow.tasks.journey import FILE, JourneyEntry, table, to_json
from distilflow.tasks.stages import output_kind, preflight, run_stage
from distilflow.tasks.tracking import MlflowTracker, flatten


@task(name="run-stage", task_run_name="run-{name}", retry_condition_fn=retry_if_transient,
      cache_policy=NO_CACHE, persist_result=False)  # the stage's own cache is by artifact digest
def stage_task(name: str, cfg: PipelineConfig, upstream: tuple[StageOutput, ...], mlflow_run_id: str) -> StageOutput:
    tracker = MlflowTracker.attach(tracking_uri(cfg), mlflow_run_id)
    return run_stage(name, cfg, *upstream, tracker=tracker)


@flow(validate_parameters=False)
def stage_flow(name: str, cfg: PipelineConfig, upstream: tuple[StageOutput, ...], mlflow_run_id: str) -> StageOutput:
    return stage_in_this_flow_run(name, cfg, upstream, mlflow_run_id)


def stage_in_this_flow_run(name: str, cfg: PipelineConfig, upstream: tuple[StageOutput, ...],
                           mlflow_run_id: str) -> StageOutput:
    """The stage as a retried task of the current flow run, its summary as the run's artifact."""
    result = retried(stage_task, cfg)(name, cfg, upstream, mlflow_run_id)
    get_run_logger().info("%s %s: %s", name, "reused" if result.cached else "done", result.directory)
    if result.summary:
        create_markdown_artifact(key=f"{_artifact_key(cfg.run.name)}-{name}", markdown=result.summary,
                                 description=f"{name} stage summary")
    return result


def stage(name: str, cfg: PipelineConfig, mlflow_run_id: str, *upstream: StageOutput) -> StageOutput:
    """Stage ``name`` as a child flow run, on the outputs of the stages it reads (its function's signature): in this
    process, or on its work pool when `run.stages` places it there."""
    stop_if_cancelled()
    if getattr(cfg.run.stages, name):
        return stage_on_its_pool(name, cfg, mlflow_run_id, *upstream)
    return stage_flow.with_options(name=f"distilflow-{name}", flow_run_name=name)(name, cfg, upstream, mlflow_run_id)


STAGE_FLOW = "distilflow-stage"


@flow(name=STAGE_FLOW, validate_parameters=False)
def pooled_stage_flow(name: str, config: dict, upstream: list[dict], mlflow_run_id: str) -> str:
    """One stage in a work pool worker's flow-run process: its upstream artifacts fetched from the store, the stage
    run as in the pipeline's own process (cached by key, retried, tracked in the pipeline's MLflow run), its output
    published to the store. Returns its artifact key."""
    send_logs_to_prefect()
    cfg = placed(PipelineConfig.model_validate(config), name)
    store = open_store(cfg.run.artifact_store)
    inputs = tuple(artifacts.fetched(each["stage"], each["key"], cfg.run.workdir, output_kind(each["stage"]), store)
                   for each in upstream)
    result = stage_in_this_flow_run(name, cfg, inputs, mlflow_run_id)
    store.record_stage_run(str(flow_run.id), name, result.directory.name)
    return result.directory.name


def placed(cfg: PipelineConfig, name: str) -> PipelineConfig:
    """The config as stage ``name`` sees it on its pool's machines: the workdir there."""
    workdir = getattr(cfg.run.stages, name).workdir
    return cfg.model_copy(update={"run": cfg.run.model_copy(update={"workdir": workdir})}) if workdir else cfg


def stage_on_its_pool(name: str, cfg: PipelineConfig, mlflow_run_id: str, *upstream: StageOutput) -> StageOutput:
    """Run stage ``name`` as a run of its deployment on its work pool (a child flow run of this one), wait for it,
    and read its output from the artifact store."""
    placement = getattr(cfg.run.stages, name)
    parameters = {"name": name, "config": cfg.model_dump(mode="json"), "mlflow_run_id": mlflow_run_id,
                  "upstream": [{"stage": each.directory.parent.name, "key": each.directory.name} for each in upstream]}
    child = run_deployment(f"{STAGE_FLOW}/{stage_deployment_name(cfg, name)}", parameters=parameters,
                           job_variables=placement.job_variables or None, flow_run_name=name, as_subflow=True,
                           poll_interval=STAGE_POLL_S)
    if not child.state.is_completed():
        raise StageRunFailed(
            f"stage {name} on work pool {placement.work_pool} ended {child.state.name} (flow run {child.name}, "
            f"{child.id}): {(child.state.message or 'no message').rstrip('.')}. Its worker's log says why; run the "
            "pipeline again to resume from the stage's checkpoints")
    store = open_store(cfg.run.artifact_store)
    recorded = store.stage_run(str(child.id))
    if recorded is None:
        raise StageRunFailed(f"stage {name}'s flow run {child.id} completed but recorded no artifact in "
                             f"run.artifact_store {cfg.run.artifact_store}: did its worker use another store?")
    return artifacts.fetched(name, recorded["key"], cfg.run.workdir, output_kind(name), store)


STAGE_POLL_S = 1  # how often the pipeline asks the server whether a pooled stage ended (Prefect's default: 5 s)


class StageRunFailed(DistilflowError):
    """A stage on its work pool ended Failed, Crashed or Cancelled; the message names the stage, pool and flow run."""


def stage_deployment_name(cfg: PipelineConfig, name: str) -> str:
    return f"{cfg.run.name}-{name}"


def register_stage_deployments(cfg: PipelineConfig) -> None:
    """The deployment of each stage that `run.stages` places on a work pool, on that pool (an update if it exists):
    the pipeline starts its runs there. Registered by module path: the pool's workers run the installed package."""
    for name, placement in cfg.run.stages:
        if placement:
            pooled_stage_flow.to_deployment(
                name=stage_deployment_name(cfg, name), description=f"distilflow's {name} stage of {cfg.run.name}",
                tags=["distilflow", name], job_variables=placement.job_variables,
                entrypoint_type=EntrypointType.MODULE_PATH).apply(work_pool_name=placement.work_pool)


@flow(name="distilflow", validate_parameters=True)
def pipeline(config_path: str, overrides: dict[str, Any] | None = None) -> dict:
    """Run the whole pipeline for a YAML config: prototype, distill, compress, deploy.

    Args:
        config_path: The pipeline's YAML config (relative paths: against the flow run's working directory).
        overrides: Dotted config keys and their values, e.g. {"distill.lora.r": 16}; validated with the
            config before any stage starts. A run of a deployment gets the deployment's own overrides too,
            under these (a key set in both takes this run's value).
    """
    send_logs_to_prefect()
    overrides = {**deployment_overrides(), **(overrides or {})}
    cfg = load_config(config_path, overrides)
    logging.getLogger("distilflow").info("config %s, overrides %s; workdir %s", Path(config_path).resolve(),
                                         overrides or "none", cfg.run.workdir)
    preflight(cfg, tracking_uri(cfg))
    cfg.run.workdir.mkdir(parents=True, exist_ok=True)
    register_stage_deployments(cfg)
    tracker = retried(start_tracking, cfg)(cfg)
    try:
        prototype = stage("prototype", cfg, tracker.run_id)
        distill = stage("distill", cfg, tracker.run_id, prototype)
        compress = stage("compress", cfg, tracker.run_id, prototype, distill)
        deploy = stage("deploy", cfg, tracker.run_id, prototype, distill, compress)
    except BaseException as err:
        tracker.finish(err)
        raise
    bundle = deploy.bundle.resolve()
    mlflow_run = retried(finish_tracking, cfg)(tracker, deploy.journey, bundle)
    journey = to_json(deploy.journey)
    record = {"run_id": str(flow_run.id), "mlflow_run_id": tracker.run_id,
              "mlflow_tracking_uri": tracking_uri(cfg), "bundle": str(bundle), "journey": journey}
    outcome = retried(release, cfg)(cfg, record)
    # Recorded after the release, gate verdict included, so `report` never shows a rejected bundle as the one
    # to ship; and recorded when the gate fails too, so `report` explains the newest run.
    record = {**record, "release": outcome.as_dict()}
    history.record_run(cfg.run.workdir, record, history.distilflow_home())
    publish_artifacts(cfg.run.name, deploy.journey, bundle, mlflow_run, outcome)
    if not outcome.passed:
        raise registry.GateFailed(outcome.failure())
    return record


def stop_if_cancelled() -> None:
    """The runner cancels a run (`distilflow serve` stopping) with SIGTERM after telling the run's process over its
    control channel. Python drops a signal handler's exception raised inside a finalizer (weakref callbacks while
    models load: "Exception ignored in ..."), so the run could go on; the intent itself is never lost."""
    if control_listener.get_intent() == "cancel":
        raise TerminationSignal(signal.SIGTERM)


def send_logs_to_prefect() -> None:
    """distilflow's own lines (stage progress, resume notices, scores) in the flow run's logs, however the run was
    started: a served or worker flow-run process has no CLI to set the level or PREFECT_LOGGING_EXTRA_LOGGERS."""
    logger = logging.getLogger("distilflow")
    logger.setLevel(logging.INFO)
    if not any(isinstance(handler, APILogHandler) for handler in logger.handlers):
        logger.addHandler(APILogHandler())


def deployment_overrides() -> dict[str, Any]:
    """The overrides the run's deployment was registered with (`distilflow serve --set`), or {}.

    Prefect replaces a parameter a run sets instead of merging it, so a run triggered with its own `overrides`
    would otherwise silently drop the deployment's (its workdir, its registry name) and write elsewhere.
    """
    if deployment.id is None:
        return {}
    with get_client(sync_client=True) as client:
        return dict(client.read_deployment(UUID(deployment.id)).parameters.get("overrides") or {})


def tracking_uri(cfg: PipelineConfig) -> str:
    return tracking.tracking_uri(cfg.run.mlflow_tracking_uri, cfg.run.workdir)


@task(retry_condition_fn=retry_if_transient, cache_policy=NO_CACHE, persist_result=False)
def start_tracking(cfg: PipelineConfig) -> MlflowTracker:
    """The pipeline's MLflow run; runs of this workdir that a killed process left RUNNING are closed first."""
    tracker = MlflowTracker.start(
        tracking_uri(cfg), experiment=cfg.run.name, artifact_root=cfg.run.workdir / "mlartifacts",
        run_name=flow_run.name or "distilflow", tags={"prefect.flow_run_id": str(flow_run.id),
                                                      "prefect.flow_run_name": str(flow_run.name)},
        liveness_dir=tracking.liveness_dir(cfg.run.workdir))
    crash_flow_runs([run.data.tags["prefect.flow_run_id"] for run in tracker.close_stale_runs()
                     if "prefect.flow_run_id" in run.data.tags])
    tracker.log_params(flatten(cfg.model_dump(mode="json")))
    return tracker


def crash_flow_runs(flow_run_ids: list[str]) -> None:
    """Flow runs whose process was killed stay RUNNING on the Prefect server: end them Crashed."""
    if not flow_run_ids:
        return
    with get_client(sync_client=True) as client:
        for flow_run_id in flow_run_ids:
            try:
                found = client.read_flow_run(UUID(flow_run_id))
            except (ObjectNotFound, ValueError):
                continue  # another server's run (a temporary server's, since gone)
            if not found.state or not found.state.is_final():
                client.set_flow_run_state(found.id, Crashed(message="its process was killed; closed by a later run"),
                                          force=True)


@task(retry_condition_fn=retry_if_transient, cache_policy=NO_CACHE, persist_result=False)
def finish_tracking(tracker: MlflowTracker, journey: list[JourneyEntry], bundle: Path) -> str:
    """Close the MLflow run with the journey; returns where to see it (markdown)."""
    tracker.log_metrics({f"journey.{e.key}.{k}": v for e in journey for k, v in flatten(e.as_json()).items()})
    tracker.log_artifact(bundle / FILE)
    tracker.finish()
    return mlflow_run_reference(tracker)


def mlflow_run_reference(tracker: MlflowTracker) -> str:
    """A link to the run in the tracking server's UI; for a local store, how to open a UI on it."""
    uri = tracker.client.tracking_uri
    if uri.startswith(("http://", "https://")):
        experiment = tracker.client.get_run(tracker.run_id).info.experiment_id
        return f"MLflow run: [{tracker.run_id}]({uri.rstrip('/')}/#/experiments/{experiment}/runs/{tracker.run_id})"
    return f"MLflow run `{tracker.run_id}` in `{uri}` (to browse it: `mlflow ui --backend-store-uri {uri}`)"


def publish_artifacts(run_name: str, journey: list[JourneyEntry], bundle: Path, mlflow_run: str,
                      outcome: registry.Release) -> None:
    """The journey (with its MLflow run and the gate's verdict) and the bundle as Prefect artifacts. Their keys
    hold only the run name, so the runs of one config (each night's) make one history in the UI's Artifacts page."""
    key = _artifact_key(run_name)
    create_markdown_artifact(
        key=f"journey-{key}",
        markdown=f"# {run_name}: journey\n\n{table(journey)}\n\n{mlflow_run}\n\n{outcome.summary()}\n\n"
                 f"Bundle: `{bundle}`\n",
        description="Task score, size and speed of every model state")
    create_link_artifact(key=f"bundle-{key}", link=bundle.as_uri(),
                         link_text=f"{bundle}{'' if outcome.passed else ' (rejected by the deploy gate)'}",
                         description="The deployable bundle: model, tokenizer, model card, journey, manifest")


@task(retry_condition_fn=retry_if_transient, cache_policy=NO_CACHE, persist_result=False)
def release(cfg: PipelineConfig, record: dict) -> registry.Release:
    """Register the bundle in MLflow's model registry; deploy.gate decides whether `champion` moves.

    A retry is safe: a bundle already registered (same digest) is found, not registered twice. The gate's checks
    go to an artifact; the caller fails the flow run when the model did not pass.
    """
    outcome = registry.release(cfg, Path(record["bundle"]), record["mlflow_tracking_uri"], record["mlflow_run_id"],
                               record["run_id"])
    create_markdown_artifact(key=f"gate-{_artifact_key(cfg.run.name)}", markdown=outcome.markdown(),
                             description="Deploy gate: its checks, and where the champion alias points")
    return outcome


def _artifact_key(name: str) -> str:
    return "".join(c if c.isalnum() else "-" for c in name.lower()).strip("-") or "run"
