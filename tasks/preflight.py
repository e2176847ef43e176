"""The part of preflight about files and stores, importable without the ML stack: `distilflow run` and `validate`
check it as soon as the config loads, so a read-only workdir or an unusable MLflow store is named in a second, not
after torch, transformers and Prefect have loaded. `stages.preflight` starts with it."""

from distilflow.configs.schema import PipelineConfig
from distilflow.tasks import artifact_store, artifacts, history
from distilflow.tasks.data import check_few_shot_pool, load_task_data
from distilflow.tasks.tracking import check_tracking_store, tracking_source


def check_files_and_stores(cfg: PipelineConfig, tracking_uri: str) -> None:
    """Task data (and its few-shot pool), workdir, artifact store, DISTILFLOW_HOME and tracking store."""
    check_few_shot_pool(load_task_data(cfg.task, cfg.run.seed), cfg.task, cfg.prototype)
    artifacts.check_writable(cfg.run.workdir)
    if cfg.run.artifact_store:
        artifact_store.check_store(cfg.run.artifact_store)
    history.check_home(history.distilflow_home())
    check_tracking_store(tracking_uri, tracking_source(cfg.run.mlflow_tracking_uri))
