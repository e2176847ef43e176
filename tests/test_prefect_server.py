"""Operations against a real Prefect server on loopback: `distilflow serve` registers the pipeline's
deployment with its schedule; runs triggered through the API execute it one at a time, with their
parameters validated before any stage; prefect.yaml's deployments register on the same server.

One server, one `distilflow serve` and two triggered runs for the whole module (about 3 minutes on
2 cores: most of it is the tiny pipeline and the flow-run processes importing torch).
"""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from contextlib import contextmanager
from pathlib import Path
from uuid import UUID

import pytest
import yaml
from mlflow import MlflowClient
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import (ArtifactFilter, ArtifactFilterFlowRunId, FlowRunFilter, FlowRunFilterId,
                                            FlowRunFilterParentFlowRunId, LogFilter, LogFilterFlowRunId,
                                            TaskRunFilter, TaskRunFilterId)
from prefect.client.schemas.objects import ConcurrencyLimitStrategy, StateType
from prefect.exceptions import PrefectHTTPStatusError
from prefect.events.worker import EventsWorker
from prefect.logging.handlers import APILogWorker
from prefect.settings import PREFECT_API_URL, temporary_settings

from distilflow.configs.loader import load_config
from tests.conftest import REPO, TINY_CONFIG, TINY_TEACHER, free_port, with_stages
from tests.team_stack import stop

STARTUP_S = 180  # server and serve start in 10-40 s on a loaded 2-core machine
RUN_S = 600
POOL_TYPES = {"distilflow-process": "process", "distilflow-docker": "docker", "distilflow-k8s": "kubernetes"}


def start(command: list[str], env: dict, log: Path) -> subprocess.Popen:
    with open(log, "w") as out:
        return subprocess.Popen(command, env=env, stdout=out, stderr=subprocess.STDOUT, cwd=REPO)


def wait_for(condition, what: str, timeout_s: float, process: subprocess.Popen | None = None, log: Path | None = None):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            pytest.fail(f"{what}: the process exited ({process.returncode}):\n{log.read_text()[-4000:]}")
        value = condition()
        if value:
            return value
        time.sleep(1)
    pytest.fail(f"{what}: not within {timeout_s} s" + (f":\n{log.read_text()[-4000:]}" if log else ""))


def healthy(url: str) -> bool:
    try:
        with urllib.request.urlopen(f"{url}/health", timeout=2) as answer:
            return json.loads(answer.read()) is True
    except OSError:
        return False


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """`prefect server start` on a free loopback port, its state in a temp PREFECT_HOME."""
    home = tmp_path_factory.mktemp("prefect-server")
    url = f"http://127.0.0.1:{free_port()}/api"
    env = {**os.environ, "PREFECT_HOME": str(home / "prefect"), "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
           "PREFECT_UI_ENABLED": "false",
           # a run waiting for the deployment's concurrency slot looks again every 2 s (default 30 s)
           "PREFECT_SERVER_DEPLOYMENTS_CONCURRENCY_SLOT_WAIT_SECONDS": "2"}
    port = url.split(":")[-1].split("/")[0]
    process = start([sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1", "--port", port],
                    env, home / "server.log")
    try:
        wait_for(lambda: healthy(url), "prefect server", STARTUP_S, process, home / "server.log")
        yield {"url": url, "home": home}
    finally:
        stop(process)


@contextmanager
def against(server):
    """Flows, tasks and clients of this process talk to ``server`` inside this context.

    Prefect's log and event workers are process-wide and keep the server they were started for: they
    are drained while it still answers, or a later test's flow would wait on them for a dead server.
    """
    with temporary_settings({PREFECT_API_URL: server["url"]}):
        try:
            yield
        finally:
            APILogWorker.drain_all(timeout=30)
            EventsWorker.drain_all(timeout=30)


@contextmanager
def prefect_client(server):
    with against(server), get_client(sync_client=True) as client:
        yield client


@pytest.fixture(scope="module")
def served(server, tmp_path_factory, tiny_prototype):
    """`distilflow serve configs/tiny.yaml --cron ... --name ops-test`, the workdir in tmp via --set (holding the
    session's prototype stage: its runs train and compress)."""
    home = tmp_path_factory.mktemp("serve")
    workdir = with_stages(home / "work", tiny_prototype)
    env = {**os.environ, "PREFECT_API_URL": server["url"], "PREFECT_HOME": str(server["home"] / "client"),
           "DISTILFLOW_HOME": str(home / "distilflow"), "PREFECT_RUNNER_POLL_FREQUENCY": "1"}
    process = start([sys.executable, "-m", "distilflow.flows.cli", "serve", str(TINY_CONFIG),
                     "--cron", "0 2 * * *", "--name", "ops-test", "--set", f"run.workdir={workdir}"],
                    env, home / "serve.log")

    def registered():
        with prefect_client(server) as client:
            try:
                deployment = client.read_deployment_by_name("distilflow/ops-test")
            except Exception:  # not there yet
                return None
            return deployment if deployment.last_polled else None  # the runner is polling for its runs

    try:
        deployment = wait_for(registered, "distilflow serve", STARTUP_S, process, home / "serve.log")
        yield {"deployment": deployment, "workdir": workdir, "log": home / "serve.log"}
    finally:
        stop(process)  # before the server (the fixture order does it): serve pauses its schedule on exit


def final(client, flow_run_id: UUID, log: Path):
    def done():
        run = client.read_flow_run(flow_run_id)
        return run if run.state and run.state.is_final() else None

    return wait_for(done, f"flow run {flow_run_id}", RUN_S, log=log)


@pytest.fixture(scope="module")
def runs(server, served):
    """A run whose overrides leave out the deployment's (its workdir): they are merged. While it runs, three
    more triggers, each with an unknown key: they wait, then start in the order they were made."""
    good = {"distill.lora.r": 2}
    with prefect_client(server) as client:
        deployment_id = served["deployment"].id
        first = client.create_flow_run_from_deployment(deployment_id, parameters={"overrides": good})
        wait_for(lambda: client.read_flow_run(first.id).state.type == StateType.RUNNING, "first run starts",
                 STARTUP_S, log=served["log"])
        waiting = [client.create_flow_run_from_deployment(deployment_id, parameters={"overrides": {key: 16}})
                   for key in ("distill.lora.rank", "distill.lora.rank2", "distill.lora.rank3")]
        result = {"first": final(client, first.id, served["log"]),
                  "waiting": [final(client, run.id, served["log"]) for run in waiting]}
        result["second"] = result["waiting"][0]
        for name in ("first", "second"):
            run_id = result[name].id
            result[f"{name}_states"] = [state.name for state in client.read_flow_run_states(run_id)]
            result[f"{name}_stages"] = client.read_flow_runs(
                flow_run_filter=FlowRunFilter(parent_flow_run_id=FlowRunFilterParentFlowRunId(any_=[run_id])))
        result["artifacts"] = {a.key: a for a in client.read_artifacts(
            artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[first.id])))}
        run_ids = [first.id, *[stage.id for stage in result["first_stages"]]]
        result["logs"] = client.read_logs(log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(any_=run_ids)))
    return result


def test_serve_registers_the_deployment_with_its_cron(served):
    [schedule] = served["deployment"].schedules
    assert (schedule.schedule.cron, schedule.schedule.timezone, schedule.active) == ("0 2 * * *", "UTC", True)


def test_served_deployment_takes_the_config_path_and_overrides(served):
    assert served["deployment"].parameters == {"config_path": str(TINY_CONFIG),
                                               "overrides": {"run.workdir": str(served["workdir"])}}


def test_served_deployment_allows_one_run_at_a_time(served):
    deployment = served["deployment"]
    assert deployment.global_concurrency_limit.limit == 1
    assert deployment.concurrency_options.collision_strategy == ConcurrencyLimitStrategy.ENQUEUE


def test_triggered_run_with_overrides_completes(runs):
    assert runs["first"].state.type == StateType.COMPLETED, runs["first"].state.message


def test_each_stage_is_a_completed_child_flow_run(runs):
    stages = {run.name: run.state.type for run in runs["first_stages"]}
    assert stages == dict.fromkeys(["prototype", "distill", "compress", "deploy"], StateType.COMPLETED)


def test_mlflow_parent_run_carries_the_flow_run_id_and_the_overrides(runs, served):
    client = MlflowClient(f"sqlite:///{served['workdir'] / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("tiny")
    [parent] = client.search_runs([experiment.experiment_id],
                                  filter_string=f"tags.`prefect.flow_run_id` = '{runs['first'].id}'")
    assert parent.info.status == "FINISHED"
    assert parent.data.params["distill.lora.r"] == "2"


def test_journey_artifact_shows_the_table_and_the_mlflow_run(runs):
    markdown = runs["artifacts"]["journey-tiny"].data
    assert "| deployed |" in markdown and "MLflow run" in markdown and "mlflow ui --backend-store-uri" in markdown


def test_bundle_link_artifact_points_at_the_bundle(runs):
    link = runs["artifacts"]["bundle-tiny"].data
    bundle = Path(link[link.index("(file://") + len("(file://"):link.rindex(")")])
    assert (bundle / "journey.json").is_file()


def test_run_with_a_bad_override_fails_before_any_stage_with_the_config_error(runs):
    second = runs["second"]
    assert second.state.type == StateType.FAILED
    assert "distill.lora.rank: unknown key" in second.state.message
    assert runs["second_stages"] == []


def test_second_trigger_waits_until_the_running_one_finished(runs):
    assert runs["second"].start_time >= runs["first"].end_time
    assert runs["second_states"][0] == "Scheduled" and "Running" in runs["second_states"]


def test_waiting_triggers_start_in_the_order_they_were_made(runs):
    waiting = runs["waiting"]
    assert [run.start_time for run in waiting] == sorted(run.start_time for run in waiting)
    assert [run.created for run in waiting] == sorted(run.created for run in waiting)
    assert all(run.state.type == StateType.FAILED for run in waiting)


def test_a_run_with_its_own_overrides_keeps_the_deployments(runs, served):
    client = MlflowClient(f"sqlite:///{served['workdir'] / 'mlflow.db'}")
    [parent] = client.search_runs([client.get_experiment_by_name("tiny").experiment_id],
                                  filter_string=f"tags.`prefect.flow_run_id` = '{runs['first'].id}'")
    assert parent.data.params["run.workdir"] == str(served["workdir"]) and parent.data.params["distill.lora.r"] == "2"


def test_a_served_run_sends_distilflows_own_lines_to_prefect(runs):
    messages = [log.message for log in runs["logs"] if log.name == "distilflow"]
    assert any(m.startswith("distill: running") for m in messages), messages
    assert any(m.startswith("config ") and "'distill.lora.r': 2" in m for m in messages)


def test_override_of_the_wrong_type_is_refused_by_the_server(server, served):
    with prefect_client(server) as client, pytest.raises(PrefectHTTPStatusError, match="overrides"):
        client.create_flow_run_from_deployment(served["deployment"].id, parameters={"overrides": "r=16"})


def recorded_task_runs(server, flow_run_id: UUID | None = None, task_run_id: UUID | None = None) -> list:
    """The task runs of a flow run (or one task run) once the server has recorded their final states:
    task states arrive as events, a moment after the task ended."""
    task_filter = TaskRunFilter(id=TaskRunFilterId(any_=[task_run_id])) if task_run_id else None
    flow_filter = FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])) if flow_run_id else None

    def recorded():
        with prefect_client(server) as client:
            found = client.read_task_runs(task_run_filter=task_filter, flow_run_filter=flow_filter)
        return found if found and all(run.state and run.state.is_final() for run in found) else None

    return wait_for(recorded, "task runs recorded", 60)


def start_tracking_call(cfg, tmp_path, dead_uri):
    from distilflow.flows.pipeline import start_tracking

    return start_tracking, (cfg,)


def release_call(cfg, tmp_path, dead_uri):
    from distilflow.flows.pipeline import release

    bundle = tmp_path / "bundle"
    bundle.mkdir()
    (bundle / "journey.json").write_text("[]")
    return release, (cfg, {"bundle": str(bundle), "mlflow_tracking_uri": dead_uri, "mlflow_run_id": "0" * 32,
                           "run_id": "flow-run"})


@pytest.mark.parametrize("call", [start_tracking_call, release_call], ids=["tracking", "registry"])
def test_transient_failure_of_an_mlflow_call_is_retried(server, monkeypatch, tmp_path, call):
    from distilflow.flows.retries import retried

    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")  # MLflow's own retries would take minutes
    dead_uri = f"http://127.0.0.1:{free_port()}"
    cfg = load_config(TINY_CONFIG, {"run.workdir": str(tmp_path), "run.retries": 2, "run.retry_delay_seconds": 0,
                                    "run.mlflow_tracking_uri": dead_uri})
    work, args = call(cfg, tmp_path, dead_uri)
    with against(server):
        state = retried(work, cfg)(*args, return_state=True)
    assert state.is_failed()
    [task_run] = recorded_task_runs(server, task_run_id=state.state_details.task_run_id)
    assert task_run.run_count == 3


def test_failing_stage_fails_its_flow_run_with_the_error_and_no_retry(server, tmp_path):
    from distilflow.flows.pipeline import pipeline

    broken = Path(shutil.copytree(TINY_TEACHER, tmp_path / "broken-teacher"))  # passes preflight, fails to load
    (broken / "model.safetensors").write_bytes((broken / "model.safetensors").read_bytes()[:1000])
    overrides = {"run.workdir": str(tmp_path / "work"), "prototype.teacher.path": str(broken),
                 "run.retries": 2, "run.retry_delay_seconds": 0}
    failure = "prototype.teacher: a safetensors file"
    with against(server):
        state = pipeline(str(TINY_CONFIG), overrides, return_state=True)
    assert state.is_failed() and failure in state.message
    with prefect_client(server) as client:
        [prototype] = client.read_flow_runs(flow_run_filter=FlowRunFilter(
            parent_flow_run_id=FlowRunFilterParentFlowRunId(any_=[state.state_details.flow_run_id])))
        assert prototype.state.type == StateType.FAILED and failure in prototype.state.message
    [stage_task] = recorded_task_runs(server, flow_run_id=prototype.id)
    assert stage_task.run_count == 1


def test_prefect_yaml_deployments_register_with_the_nightly_cron(server, tmp_path):
    env = {**os.environ, "PREFECT_API_URL": server["url"], "PREFECT_HOME": str(server["home"] / "client")}
    declared = yaml.safe_load((REPO / "prefect.yaml").read_text())["deployments"]
    prefect = [sys.executable, "-m", "prefect"]
    for pool in {d["work_pool"]["name"] for d in declared}:
        subprocess.run([*prefect, "work-pool", "create", pool, "--type", POOL_TYPES[pool]], env=env, check=True,
                       capture_output=True)
    done = subprocess.run([*prefect, "--no-prompt", "deploy", "--all"], env=env, cwd=REPO, capture_output=True,
                          text=True, timeout=RUN_S)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    with prefect_client(server) as client:
        for declaration in declared:
            deployment = client.read_deployment_by_name(f"distilflow/{declaration['name']}")
            assert [s.schedule.cron for s in deployment.schedules] == ["0 2 * * *"]
            assert deployment.job_variables == declaration["work_pool"]["job_variables"]
            assert load_config(REPO / deployment.parameters["config_path"]).run.name == "support-tickets"


@pytest.fixture(scope="module", params=[signal.SIGTERM, signal.SIGINT], ids=["sigterm", "ctrl-c"])
def stopped_mid_run(request, server, tmp_path_factory, tiny_prototype):
    """`distilflow serve` stopped while its run trains (its prototype: the session's): SIGTERM to the serve process
    (as systemd or `kill` stop it), or SIGINT to its whole process group (Ctrl-C in its terminal)."""
    sig = request.param
    home = tmp_path_factory.mktemp(f"stop-{sig.name}")
    workdir, log, name = with_stages(home / "work", tiny_prototype), home / "serve.log", f"stop-{sig.name.lower()}"
    env = {**os.environ, "PREFECT_API_URL": server["url"], "PREFECT_HOME": str(server["home"] / "client"),
           "DISTILFLOW_HOME": str(home / "distilflow"), "PREFECT_RUNNER_POLL_FREQUENCY": "1"}
    with open(log, "w") as out:
        process = subprocess.Popen([sys.executable, "-m", "distilflow.flows.cli", "serve", str(TINY_CONFIG), "--name",
                                    name, "--set", f"run.workdir={workdir}",
                                    # long enough that the stop lands while distill trains, not after it
                                    "--set", "distill.sft.max_steps=40"], env=env, stdout=out,
                                   stderr=subprocess.STDOUT, cwd=REPO, start_new_session=True)
    try:
        with prefect_client(server) as client:
            deployment = wait_for(lambda: _polled(client, f"distilflow/{name}"), "serve", STARTUP_S, process, log)
            flow_run = client.create_flow_run_from_deployment(deployment.id)
            distill = workdir / "artifacts" / "distill"
            wait_for(lambda: distill.is_dir() and any(".partial-" in p.name for p in distill.iterdir()),
                     "distill starts", RUN_S, process, log)
            (os.kill if sig == signal.SIGTERM else os.killpg)(process.pid, sig)
            exit_code = process.wait(timeout=120)
            yield {"exit": exit_code, "flow_run": final(client, flow_run.id, log), "workdir": workdir,
                   "slots": client.read_deployment(deployment.id).global_concurrency_limit.active_slots,
                   "left": _group_alive(process.pid), "log": log}
    finally:
        if _group_alive(process.pid):
            os.killpg(process.pid, signal.SIGKILL)


def _polled(client, name: str):
    try:
        deployment = client.read_deployment_by_name(name)
    except Exception:  # not registered yet
        return None
    return deployment if deployment.last_polled else None


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    return True


def test_stopping_serve_mid_run_ends_the_run_cancelled_or_crashed(stopped_mid_run):
    state = stopped_mid_run["flow_run"].state
    assert stopped_mid_run["exit"] == 0, stopped_mid_run["log"].read_text()[-3000:]
    assert state.type in (StateType.CANCELLED, StateType.CRASHED), state


def test_stopping_serve_mid_run_ends_its_mlflow_runs_killed_or_failed(stopped_mid_run):
    client = MlflowClient(f"sqlite:///{stopped_mid_run['workdir'] / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("tiny").experiment_id])
    assert "RUNNING" not in [run.info.status for run in runs]
    [pipeline] = [run for run in runs if "distilflow.stage" not in run.data.tags]
    # A training phase's run carries its stage's tag too: the stages' own runs are those without a phase.
    stages = sorted((run for run in runs if "distilflow.stage" in run.data.tags and "distilflow.phase" not in
                     run.data.tags), key=lambda run: run.info.start_time)
    assert pipeline.info.status in ("KILLED", "FAILED")
    assert [run.info.status for run in stages[:-1]] == ["FINISHED"] * (len(stages) - 1)
    # With Ctrl-C the stop reaches the flow run through the runner's cancellation, which lands at the latest at the
    # next stage boundary (`stop_if_cancelled`): the stage it stopped ended KILLED, or finished and was the last.
    assert stages[-1].info.status in ("KILLED", "FAILED", "FINISHED")
    assert [run.data.tags["distilflow.stage"] for run in stages][-1] in ("distill", "compress")


def test_stopping_serve_mid_run_frees_the_concurrency_slot_and_leaves_no_process(stopped_mid_run):
    assert stopped_mid_run["slots"] == 0
    assert not stopped_mid_run["left"]
