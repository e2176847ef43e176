"""`distilflow` command line: run, validate, serve, verify, report on pipelines, and print the config's schema.

Exit codes: 0 done, 2 a problem with the input (config, data, model files, tracking store, a full disk) or a
bundle that fails `verify`, 3 the new model failed the deploy gate (it is registered as `candidate`;
`champion` did not move), 130 / 143 / 129 stopped by Ctrl-C / SIGTERM / SIGHUP, 1 anything else (a bug). An error is one
`error:` line; a run's log file (named there) holds the traceback, which --verbose also prints.
"""

import argparse
import atexit
import json
import logging
import os
import signal
import sys
import time
import traceback
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from distilflow.tasks import environment
from distilflow.tasks.errors import DistilflowError

# Prefect reads its settings at import, OpenMP when torch loads it: set this CLI's defaults first (a user's
# own env wins).
ENV_DEFAULTS = {
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "120",
    "PREFECT_LOGGING_EXTRA_LOGGERS": "distilflow",
    "PREFECT_LOGGING_TO_API_WHEN_MISSING_FLOW": "ignore",
    # MLflow's own console handler prints the tracebacks of errors it catches (a full disk's, one per call); without
    # it, MLflow's records go through the CLI's handlers as any library's do: one line on the console.
    "MLFLOW_CONFIGURE_LOGGING": "false",
    # torch's CPU threads sleep instead of spinning while they wait: on a small box, Prefect's server and
    # threads otherwise preempt a spinning thread and stall the others (the demo on 2 cores: 640 s -> 560 s).
    "OMP_WAIT_POLICY": "PASSIVE",
}


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    _log_to_console(args.verbose)
    try:
        return args.command(args)
    except DistilflowError as err:
        return _fail(args, err, f"error: {err}", err.exit_code)
    except KeyboardInterrupt as err:
        signal_number = getattr(err, "signal_number", signal.SIGINT)
        return _fail(args, err, f"stopped by {signal.Signals(signal_number).name}: finished stages are kept, nothing "
                                "half-written is published, and the same command resumes", 128 + signal_number)
    except Exception as err:
        problem = environment.problem(err, getattr(args, "mlflow_store", None))
        if problem is None and args.verbose:
            raise
        return _fail(args, err, f"error: {problem}" if problem else
                     f"error: unexpected {type(err).__name__}: {err} (a bug in distilflow or a library; please report it)",
                     2 if problem else 1)


def run(args) -> int:
    from distilflow.configs.loader import load_config, parse_overrides
    from distilflow.tasks.preflight import check_files_and_stores
    from distilflow.tasks.tracking import tracking_uri

    _stop_orphaned_prefect_servers()
    overrides = parse_overrides(args.set)
    cfg = load_config(args.config, overrides)  # fail on a bad config before Prefect starts
    args.log_file = _log_to_file(cfg.run.workdir)
    args.mlflow_store = tracking_uri(cfg.run.mlflow_tracking_uri, cfg.run.workdir)  # named if its disk fills
    check_files_and_stores(cfg, args.mlflow_store)  # in a second, before the ML stack and Prefect load
    _set_env_defaults()
    with _stopped_by(signal.SIGTERM, signal.SIGHUP):
        from distilflow.flows.deployments import check_pools_have_a_server, check_prefect_api
        from distilflow.flows.pipeline import pipeline

        check_prefect_api()
        check_pools_have_a_server(cfg)
        _start_temporary_prefect_server()
        record = pipeline(config_path=str(args.config), overrides=overrides)
    print(_report(record))
    return 0


def validate(args) -> int:
    from distilflow.configs.loader import load_config, parse_overrides
    from distilflow.tasks.data import load_task_data
    from distilflow.tasks.preflight import check_files_and_stores
    from distilflow.tasks.tracking import tracking_uri

    cfg = load_config(args.config, parse_overrides(args.set))
    # Exactly what a run checks first (stages.preflight), its files and stores before the ML stack loads.
    check_files_and_stores(cfg, tracking_uri(cfg.run.mlflow_tracking_uri, cfg.run.workdir))
    from distilflow.tasks.stages import check_devices_servers_and_models, length_warnings

    check_devices_servers_and_models(cfg)
    examples = load_task_data(cfg.task, cfg.run.seed)
    for warning in length_warnings(cfg, examples):
        print(f"warning: {warning}", file=sys.stderr)
    print(f"{args.config}: valid ({len(examples.train)} training inputs, {len(examples.eval)} held-out, "
          f"{len(examples.pool)} in the few-shot pool; {examples.duplicates} duplicate inputs removed)")
    return 0


def serve(args) -> int:
    from distilflow.configs.loader import load_config, parse_overrides
    from distilflow.tasks.stages import preflight
    from distilflow.tasks.tracking import tracking_uri

    overrides = parse_overrides(args.set)
    flags = {key: value for key, value in [("schedule.cron", args.cron), ("schedule.deployment", args.name)] if value}
    cfg = load_config(args.config, {**overrides, **flags})
    preflight(cfg, tracking_uri(cfg.run.mlflow_tracking_uri, cfg.run.workdir))  # fail now, not at 02:00
    _set_env_defaults()
    from distilflow.flows.deployments import serve_pipeline

    serve_pipeline(Path(args.config).resolve(), overrides, cfg)
    return 0


def schema(args) -> int:
    from distilflow.configs.schema import PipelineConfig

    text = json.dumps({"$schema": "https://json-schema.org/draft/2020-12/schema",
                       **PipelineConfig.model_json_schema()}, indent=1)
    if args.output:
        Path(args.output).write_text(text + "\n")
        print(f"{args.output}: the config's JSON schema")
    else:
        print(text)
    return 0


REPORT_FIELDS = ("run_id", "mlflow_run_id", "mlflow_tracking_uri", "bundle", "journey", "release")


def report(args) -> int:
    from distilflow.tasks.history import INDEX, distilflow_home, latest_run

    home = distilflow_home()
    record = latest_run(home)
    if args.json:
        print(json.dumps({k: record.get(k) for k in REPORT_FIELDS}))
        return 0
    try:
        text = _report(record)
    except (KeyError, TypeError, ValueError, AttributeError, IndexError) as err:  # a record edited, or not ours
        raise DistilflowError(f"the latest run's record (named by the last line of {home / INDEX}) is not one this "
                              f"distilflow can print ({type(err).__name__}: {err}); `distilflow report --latest --json` "
                              "shows what it holds; the next finished run records a new one") from err
    print(text)
    return 0


def verify(args) -> int:
    from distilflow.tasks.artifacts import MANIFEST, manifest_problems, read_manifest

    bundle = Path(args.bundle)
    if not bundle.is_dir():
        raise DistilflowError(f"{bundle.resolve()}: no such bundle directory (`distilflow report --latest` prints "
                              "the newest)")
    problems = manifest_problems(bundle)
    if problems:
        raise DistilflowError(f"{bundle}: does not match {MANIFEST} ({len(problems)} problem"
                              f"{'s' * (len(problems) > 1)}):\n  " + "\n  ".join(problems))
    files, links = read_manifest(bundle)
    print(f"{bundle}: all {len(files)} files{f' and {len(links)} symlinks' if links else ''} match {MANIFEST}")
    return 0


def _report(record: dict) -> str:
    """The journey, where the bundle is, and the deploy gate's verdict: a bundle the gate rejected is marked so."""
    from distilflow.tasks import journey
    from distilflow.tasks.registry import CHAMPION

    release = record.get("release")
    rejected = release is not None and not release["passed"]
    gone = not Path(record["bundle"]).is_dir()
    lines = [journey.table(journey.from_json(record["journey"])),
             f"\nbundle:        {record['bundle']}{'  (REJECTED by the deploy gate: not the one to ship)' * rejected}"
             f"{'  (no longer on disk)' * gone}",
             f"MLflow run id: {record['mlflow_run_id']}  ({record['mlflow_tracking_uri']})",
             f"run id:        {record['run_id']}"]
    if release is None:
        return "\n".join(lines + ["gate:          not recorded (a run from an older distilflow)"])
    name, champion = release["model_name"], release["champion"]
    lines.append(f"model:         {name} version {release['version']} (aliases: {', '.join(release['aliases']) or 'none'})")
    if rejected:
        reasons = "; ".join(f"{c['key']}: {c['detail']}" for c in release["checks"] if not c["passed"])
        ship = f"version {champion}: ship models:/{name}@{CHAMPION}" if champion else "no version yet"
        lines.append(f"gate:          FAILED ({reasons}); `{CHAMPION}` is {ship}")
    else:
        lines.append(f"gate:          passed; `{CHAMPION}` is version {champion}")
    return "\n".join(lines)


def _start_temporary_prefect_server() -> None:
    """Without PREFECT_API_URL, Prefect starts a temporary server in a subprocess (and stops it at exit). Started
    here first (Prefect then uses this one), guarded from the moment its process exists: if this process is killed
    with SIGKILL, even while the server still starts, a guard stops it (Linux), and its recorded pid lets the next run
    stop it where no guard could (or the guard was killed too)."""
    from prefect.server.api.server import SubprocessASGIServer
    from prefect.settings import get_current_settings

    from distilflow.tasks.artifacts import check_writable
    from distilflow.tasks.fresh_process import stop_when_this_process_dies
    from distilflow.tasks.history import check_home, distilflow_home

    class GuardedServer(SubprocessASGIServer):
        def _run_uvicorn_command(self):  # Prefect's one place that starts the server's process
            process = super()._run_uvicorn_command()
            stop_when_this_process_dies(process.pid)
            record = _servers_dir() / f"{process.pid}.json"
            record.parent.mkdir(parents=True, exist_ok=True)
            record.write_text(json.dumps({"owner": os.getpid()}))
            atexit.register(record.unlink, missing_ok=True)
            return process

    settings = get_current_settings()
    if settings.api.url:
        return
    check_writable(Path(settings.home), "PREFECT_HOME", "the temporary Prefect server keeps its database there")
    check_home(distilflow_home())  # the server's pid is recorded there
    try:
        GuardedServer().start()
    except RuntimeError as err:  # Prefect's own words for a server that did not answer in time
        if "Timed out while attempting to connect to ephemeral Prefect API server" not in str(err):
            raise
        raise DistilflowError(
            f"the temporary Prefect server did not answer within {settings.server.ephemeral.startup_timeout_seconds} s "
            "(PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS); on a busy machine raise it, or start a server "
            "(`prefect server start`) and set PREFECT_API_URL") from err


def _stop_orphaned_prefect_servers() -> None:
    """Stop the temporary Prefect servers whose `distilflow run` was killed (their owner is gone)."""
    try:
        records = list(_servers_dir().glob("*.json"))
    except DistilflowError:
        return  # a bad DISTILFLOW_HOME: preflight names it
    for record in records:
        server = int(record.stem)
        try:
            owner = json.loads(record.read_text())["owner"]
        except (OSError, ValueError, KeyError, TypeError):
            owner = None
        if owner is not None and _alive(owner):
            continue
        if _alive(server) and TEMPORARY_SERVER in _command_line(server):
            os.kill(server, signal.SIGTERM)
            logging.getLogger("distilflow").warning(
                "stopped the temporary Prefect server (pid %d) of a killed `distilflow run` (pid %s)", server, owner)
        record.unlink(missing_ok=True)


TEMPORARY_SERVER = "prefect.server.api.server:create_app"


def _servers_dir() -> Path:
    from distilflow.tasks.history import distilflow_home

    return distilflow_home() / "prefect-servers"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _command_line(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


class Stopped(KeyboardInterrupt):
    """A termination signal, raised like Ctrl-C's KeyboardInterrupt so that every `finally`, context manager and
    atexit hook runs: MLflow runs get closed, the temporary Prefect server stopped, partial outputs removed."""

    def __init__(self, signal_number: int):
        super().__init__(signal.Signals(signal_number).name)
        self.signal_number = signal_number


@contextmanager
def _stopped_by(*signals: signal.Signals) -> Iterator[None]:
    """Inside, each of ``signals`` raises Stopped; their handlers are restored after."""
    def stop(signal_number, frame):
        raise Stopped(signal_number)

    previous = {each: signal.signal(each, stop) for each in signals}
    try:
        yield
    finally:
        for each, handler in previous.items():
            signal.signal(each, handler)


class _BriefFormatter(logging.Formatter):
    """One line per record: the console leaves tracebacks to the log file (or to --verbose)."""

    def format(self, record: logging.LogRecord) -> str:
        saved = record.exc_info, record.exc_text, record.stack_info
        record.exc_info = record.exc_text = record.stack_info = None
        try:
            return super().format(record)
        finally:
            record.exc_info, record.exc_text, record.stack_info = saved


def _restates_a_failure(record: logging.LogRecord) -> bool:
    """Prefect's lines about a failed or crashed (sub)flow or task: the CLI's own `error:` line says it once."""
    if not record.name.startswith(("prefect.flow_runs", "prefect.task_runs")):
        return False
    message = record.getMessage()
    if "Retry" in message:
        return False
    return record.levelno >= logging.ERROR or (message.startswith("Finished in state") and "Completed" not in message)


LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def _log_to_console(verbose: bool) -> None:
    """stderr shows progress (distilflow's INFO lines, Prefect's, any library's warnings); --verbose adds the
    tracebacks and Prefect's restatements of a failure."""
    root = logging.getLogger()
    for handler in [h for h in root.handlers if getattr(h, "distilflow", False)]:
        root.removeHandler(handler)
        handler.close()
    console = logging.StreamHandler(sys.stderr)
    console.distilflow = True
    console.setFormatter(logging.Formatter(LOG_FORMAT) if verbose else _BriefFormatter(LOG_FORMAT))
    if not verbose:
        console.addFilter(lambda record: not _restates_a_failure(record))
    root.addHandler(console)
    root.setLevel(logging.WARNING)
    logging.getLogger("distilflow").setLevel(logging.INFO)


class _RunLog(logging.FileHandler):
    """The run's log file. A write that fails (its disk filled) ends it with one warning, where logging would print
    a traceback for every record after."""

    failed = False

    def emit(self, record: logging.LogRecord) -> None:
        if not self.failed:
            super().emit(record)

    def handleError(self, record: logging.LogRecord) -> None:
        self.failed = True
        print(f"warning: cannot write the run's log {self.baseFilename} ({sys.exc_info()[1]}); it ends here",
              file=sys.stderr)


def _log_to_file(workdir: Path) -> Path | None:
    """Every log record of the run, tracebacks included, in WORKDIR/logs/ (None where it cannot be written:
    preflight then says why)."""
    path = workdir / "logs" / f"run-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}.log"
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        handler = _RunLog(path, encoding="utf-8")
    except OSError:
        return None
    handler.distilflow = True
    handler.setFormatter(logging.Formatter(LOG_FORMAT))
    logging.getLogger().addHandler(handler)
    return path


def _fail(args, error: BaseException, message: str, exit_code: int) -> int:
    """Print ``message``; the traceback goes to the run's log file (named in the message) or, with --verbose,
    to stderr."""
    log_file = getattr(args, "log_file", None)
    if log_file is not None and not _appended(log_file, message + "\n" + "".join(traceback.format_exception(error))):
        log_file = None
    if args.verbose:
        traceback.print_exception(error, file=sys.stderr)
    where = f"\n(the log, with the traceback: {log_file})" if log_file is not None and not args.verbose else ""
    print(message + where, file=sys.stderr)
    return exit_code


def _appended(path: Path, text: str) -> bool:
    """Whether ``text`` could be added to the file (not where its disk is full)."""
    try:
        with open(path, "a", encoding="utf-8") as file:
            file.write(text)
        return True
    except OSError:
        return False


def _set_env_defaults() -> None:
    """Before Prefect and torch are imported; flow runs and workers started from here inherit them."""
    for key, value in ENV_DEFAULTS.items():
        os.environ.setdefault(key, value)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="distilflow", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(required=True, metavar="COMMAND")
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--verbose", "-v", action="store_true",
                        help="print tracebacks and Prefect's own failure lines on stderr too")

    subs = {}
    for name, handler, text, details in [
        ("run", run, "run the pipeline for a config", ""),
        ("validate", validate, "check a config and its task data without running", ""),
        ("serve", serve, "register the pipeline for a config as a Prefect deployment",
         " (with the schedule of its `schedule:` section) and run what the UI, `prefect deployment run` or "
         "the schedule triggers, until stopped; needs PREFECT_API_URL"),
    ]:
        subs[name] = sub = commands.add_parser(name, help=text, description=text + details, parents=[common])
        sub.add_argument("config", help="pipeline YAML, e.g. configs/demo.yaml")
        sub.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                         help="override a config value, e.g. --set distill.lora.r=16 (repeatable)")
        sub.set_defaults(command=handler)
    subs["serve"].add_argument("--cron", help="schedule, e.g. \"0 2 * * *\" (02:00 nightly); default: schedule.cron")
    subs["serve"].add_argument("--name", help="deployment name; default: schedule.deployment, else run.name")

    sub = commands.add_parser("verify", parents=[common], help="check a bundle's files against its manifest.json (exit 2 if any differ)")
    sub.add_argument("bundle", help="bundle directory, e.g. the `bundle:` path `distilflow run` prints")
    sub.set_defaults(command=verify)

    sub = commands.add_parser("schema", parents=[common], help="print the config's JSON schema, for editors to complete and check keys",
                              description="print the config's JSON schema, for editors to complete and check keys "
                                          "(every TRL and PEFT field of the training sections included)")
    sub.add_argument("-o", "--output", metavar="FILE", help="write it to FILE instead")
    sub.set_defaults(command=schema)

    sub = commands.add_parser("report", parents=[common], help="print the journey of a finished run")
    sub.add_argument("--latest", action="store_true", required=True, help="the most recently finished run")
    sub.add_argument("--json", action="store_true", help=f"one JSON object: {', '.join(REPORT_FIELDS)}")
    sub.set_defaults(command=report)
    return parser


if __name__ == "__main__":
    sys.exit(main())
