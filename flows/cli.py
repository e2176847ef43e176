"""`distilflow` command line: run, validate, serve, verify and report on pipelines.

Exit codes: 0 done, 2 a problem with the input (config, data, model files) or a bundle that fails
`verify`, 3 the new model failed the deploy gate (it is registered as `candidate`; `champion` did not
move), 1 anything else.
"""

import argparse
import json
import logging
import os
import sys
from pathlib import Path

from distilflow.tasks.errors import DistilflowError

# Prefect reads its settings at import, OpenMP when torch loads it: set this CLI's defaults first (a user's
# own env wins).
ENV_DEFAULTS = {
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "120",
    "PREFECT_LOGGING_EXTRA_LOGGERS": "distilflow",
    "PREFECT_LOGGING_TO_API_WHEN_MISSING_FLOW": "ignore",
    # torch's CPU threads sleep instead of spinning while they wait: on a small box, Prefect's server and
    # threads otherwise preempt a spinning thread and stall the others (the demo on 2 cores: 640 s -> 560 s).
    "OMP_WAIT_POLICY": "PASSIVE",
}


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("distilflow").setLevel(logging.INFO)
    try:
        return args.command(args)
    except DistilflowError as err:
        print(f"error: {err}", file=sys.stderr)
        return err.exit_code


def run(args) -> int:
    from distilflow.configs.loader import load_config, parse_overrides

    overrides = parse_overrides(args.set)
    load_config(args.config, overrides)  # fail on a bad config before Prefect starts
    _set_env_defaults()
    from distilflow.flows.pipeline import pipeline

    record = pipeline(config_path=str(args.config), overrides=overrides)
    _print_report(record)
    return 0


def validate(args) -> int:
    from distilflow.configs.loader import load_config, parse_overrides
    from distilflow.tasks.data import load_task_data
    from distilflow.tasks.stages import preflight
    from distilflow.tasks.tracking import tracking_uri

    cfg = load_config(args.config, parse_overrides(args.set))
    preflight(cfg, tracking_uri(cfg.run.mlflow_tracking_uri, cfg.run.workdir))
    examples = load_task_data(cfg.task, cfg.run.seed)
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


REPORT_FIELDS = ("run_id", "mlflow_run_id", "mlflow_tracking_uri", "bundle", "journey")


def report(args) -> int:
    from distilflow.tasks.history import distilflow_home, latest_run

    record = latest_run(distilflow_home())
    if args.json:
        print(json.dumps({k: record[k] for k in REPORT_FIELDS}))
    else:
        _print_report(record)
    return 0


def verify(args) -> int:
    from pathlib import Path

    from distilflow.tasks.artifacts import MANIFEST, manifest_problems

    bundle = Path(args.bundle)
    if not bundle.is_dir():
        raise DistilflowError(f"{bundle}: no such bundle directory (`distilflow report --latest` prints the newest)")
    try:
        problems = manifest_problems(bundle)
    except (json.JSONDecodeError, KeyError, TypeError, AttributeError):
        raise DistilflowError(f"{bundle / MANIFEST}: not a distilflow manifest (JSON with a \"files\" map "
                              "of path to sha256)") from None
    if problems:
        raise DistilflowError(f"{bundle}: does not match {MANIFEST} ({len(problems)} problem"
                              f"{'s' * (len(problems) > 1)}):\n  " + "\n  ".join(problems))
    count = len(json.loads((bundle / MANIFEST).read_text())["files"])
    print(f"{bundle}: all {count} files match {MANIFEST}")
    return 0


def _print_report(record: dict) -> None:
    from distilflow.tasks.evaluate import journey_table

    print(journey_table(record["journey"]))
    print(f"\nbundle:        {record['bundle']}")
    print(f"MLflow run id: {record['mlflow_run_id']}  ({record['mlflow_tracking_uri']})")
    print(f"run id:        {record['run_id']}")
    if "release" in record:
        release = record["release"]
        print(f"model:         {release['model_name']} version {release['version']} "
              f"(aliases: {', '.join(release['aliases']) or 'none'})")


def _set_env_defaults() -> None:
    """Before Prefect and torch are imported; flow runs and workers started from here inherit them."""
    for key, value in ENV_DEFAULTS.items():
        os.environ.setdefault(key, value)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="distilflow", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(required=True, metavar="COMMAND")

    subs = {}
    for name, handler, text, details in [
        ("run", run, "run the pipeline for a config", ""),
        ("validate", validate, "check a config and its task data without running", ""),
        ("serve", serve, "register the pipeline for a config as a Prefect deployment",
         " (with the schedule of its `schedule:` section) and run what the UI, `prefect deployment run` or "
         "the schedule triggers, until stopped; needs PREFECT_API_URL"),
    ]:
        subs[name] = sub = commands.add_parser(name, help=text, description=text + details)
        sub.add_argument("config", help="pipeline YAML, e.g. configs/demo.yaml")
        sub.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                         help="override a config value, e.g. --set distill.lora.r=16 (repeatable)")
        sub.set_defaults(command=handler)
    subs["serve"].add_argument("--cron", help="schedule, e.g. \"0 2 * * *\" (02:00 nightly); default: schedule.cron")
    subs["serve"].add_argument("--name", help="deployment name; default: schedule.deployment, else run.name")

    sub = commands.add_parser("verify", help="check a bundle's files against its manifest.json (exit 2 if any differ)")
    sub.add_argument("bundle", help="bundle directory, e.g. the `bundle:` path `distilflow run` prints")
    sub.set_defaults(command=verify)

    sub = commands.add_parser("report", help="print the journey of a finished run")
    sub.add_argument("--latest", action="store_true", required=True, help="the most recently finished run")
    sub.add_argument("--json", action="store_true", help=f"one JSON object: {', '.join(REPORT_FIELDS)}")
    sub.set_defaults(command=report)
    return parser


if __name__ == "__main__":
    sys.exit(main())
