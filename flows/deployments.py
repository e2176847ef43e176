"""The pipeline as a Prefect deployment: `distilflow serve` registers it, with the schedule and concurrency
limit of the config's `schedule:` section, and runs what is triggered in the UI, by `prefect deployment
run` or by the schedule. (prefect.yaml declares the same deployment for `prefect deploy` onto work pools.)
"""

import asyncio
import logging
import signal
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from prefect.runner import Runner
from prefect.client.schemas.objects import ConcurrencyLimitConfig, ConcurrencyLimitStrategy
from prefect.client.schemas.schedules import CronSchedule
from prefect.deployments.runner import EntrypointType, RunnerDeployment
from prefect.settings import get_current_settings
from pydantic import ValidationError

from distilflow.configs.schema import PipelineConfig, ScheduleConfig
from distilflow.flows.pipeline import pipeline, register_stage_deployments
from distilflow.tasks.environment import connection_problem
from distilflow.tasks.errors import DistilflowError
from distilflow.tasks.tracking import close_abandoned_runs, liveness_dir, open_store, tracking_uri

log = logging.getLogger("distilflow")


def pipeline_deployment(config_path: Path, overrides: dict[str, Any], cfg: PipelineConfig) -> RunnerDeployment:
    """The pipeline flow deployed for ``config_path``: every run gets the config path and ``overrides`` as
    parameters (a triggered run may replace either), on the cron of ``cfg.schedule``, as many at once as
    its concurrency limit allows."""
    schedule = cfg.schedule
    return pipeline.to_deployment(
        name=schedule.deployment or cfg.run.name,
        schedules=[cron_schedule(schedule, config_path)] if schedule.cron else None,
        concurrency_limit=ConcurrencyLimitConfig(
            limit=schedule.concurrency_limit,
            collision_strategy=ConcurrencyLimitStrategy[schedule.collision_strategy.upper()]),
        parameters={"config_path": str(config_path), "overrides": overrides},
        description=f"distilflow pipeline for {config_path}",
        tags=["distilflow"],
        # by module, not file: the runner imports the installed package, wherever it was started
        entrypoint_type=EntrypointType.MODULE_PATH,
    )


def cron_schedule(schedule: ScheduleConfig, config_path: Path) -> CronSchedule:
    try:
        return CronSchedule(cron=schedule.cron, timezone=schedule.timezone)
    except ValidationError as err:
        problems = "; ".join(f"schedule.{p['loc'][0]}: {p['msg'].removeprefix('Value error, ')}" for p in err.errors())
        raise DistilflowError(f"{config_path}: {problems} (a cron has five fields, e.g. '0 2 * * *'; "
                              f"a time zone is an IANA name, e.g. 'Europe/Berlin')") from None


def serve_pipeline(config_path: Path, overrides: dict[str, Any], cfg: PipelineConfig) -> None:
    """Register the deployment and run its flow runs in this process until stopped (Ctrl-C / SIGTERM).

    Stopping cancels the flow runs in progress (their process gets SIGTERM and closes its MLflow runs; the flow
    run ends Cancelled, which frees the deployment's concurrency slot at once), then pauses the schedule, since
    nothing would run it. With `enqueue`, runs waiting for the slot start in the order they were triggered.
    """
    api_url = get_current_settings().api.url
    if not api_url:
        raise DistilflowError(
            "distilflow serve needs a Prefect server for its deployment and schedule: start one with "
            "`prefect server start` and set PREFECT_API_URL (e.g. export PREFECT_API_URL=http://127.0.0.1:4200/api)")
    deployment = pipeline_deployment(config_path, overrides, cfg)
    check_prefect_api()
    register_stage_deployments(cfg)
    # The runner submits the scheduled runs it polls earliest first, up to its limit. Holding waiting runs back
    # here keeps them in trigger order; left to the server's slot (AwaitingConcurrencySlot), each waiting run
    # retries on its own timer and the first to retry after the slot frees wins. cancel_new needs the server
    # to see (and cancel) the extra run, so the runner takes every run there.
    enqueue = cfg.schedule.collision_strategy == "enqueue"
    runner = Runner(pause_on_shutdown=True, limit=cfg.schedule.concurrency_limit if enqueue else None)
    runner.add_deployment(deployment)
    log.info("serving deployment distilflow/%s from %s; trigger it with `prefect deployment run distilflow/%s` "
             "or in the UI; stop with Ctrl-C", deployment.name, api_url, deployment.name)
    asyncio.run(_serve_until_stopped(runner))
    close_runs_left_running(cfg)


def close_runs_left_running(cfg: PipelineConfig) -> None:
    """A run that did not end within the runner's grace period after SIGTERM was killed (SIGKILL): close the MLflow
    runs it left RUNNING now, rather than at the next run of its workdir."""
    uri = tracking_uri(cfg.run.mlflow_tracking_uri, cfg.run.workdir)
    if not liveness_dir(cfg.run.workdir).is_dir():
        return  # no run ever started here
    close_abandoned_runs(open_store(uri), liveness_dir(cfg.run.workdir), "distilflow serve, stopping")


def check_prefect_api() -> None:
    """A configured Prefect API (PREFECT_API_URL or the profile's) that does not answer fails at once, named; an
    HTTP error such as 401 means something answers, and is left to Prefect."""
    url = get_current_settings().api.url
    if not url:
        return
    try:
        with urllib.request.urlopen(url.rstrip("/") + "/health", timeout=PREFECT_PROBE_TIMEOUT_S):
            pass
    except urllib.error.HTTPError:
        pass
    except (urllib.error.URLError, OSError, ValueError) as err:
        raise DistilflowError(f"the Prefect API {url} (PREFECT_API_URL) does not answer "
                              f"({connection_problem(getattr(err, 'reason', err))}); "
                              "start that server (`prefect server start`), or unset PREFECT_API_URL to run against a "
                              "temporary one") from None


PREFECT_PROBE_TIMEOUT_S = 10


def check_pools_have_a_server(cfg: PipelineConfig) -> None:
    """Stages on work pools need a Prefect server that the pools' workers poll; a run's temporary server has none."""
    pooled = {name: placement.work_pool for name, placement in cfg.run.stages if placement}
    if pooled and not get_current_settings().api.url:
        where = ", ".join(f"{name} on {pool}" for name, pool in pooled.items())
        raise DistilflowError(f"run.stages puts {where}: the pools' workers take their runs from a Prefect server; "
                              "set PREFECT_API_URL to the server they poll (e.g. http://prefect.internal:4200/api), "
                              "or remove run.stages to run every stage in this process")


async def _serve_until_stopped(runner: Runner) -> None:
    """``runner.start()``, stopped by SIGTERM or SIGINT through ``runner.astop()`` on this loop (which cancels the
    runs in progress and waits for them); a second signal ends the process at once."""
    loop = asyncio.get_running_loop()
    serving = asyncio.ensure_future(runner.start())
    # start() installs Prefect's own SIGTERM handler, then starts; that handler stops the runner from another event
    # loop, which leaves the runs in progress RUNNING and their slot held. Replace it once the runner has started.
    while not runner.started and not serving.done():
        await asyncio.sleep(0.1)

    def stop() -> None:
        for each in STOP_SIGNALS:
            loop.remove_signal_handler(each)
        log.info("stopping: cancelling the runs in progress, then pausing the schedule")
        asyncio.ensure_future(runner.astop())

    for each in STOP_SIGNALS:
        loop.add_signal_handler(each, stop)
    await serving


STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)
