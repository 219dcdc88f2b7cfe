"""The project's one MLflow helper.

Tracking model: one MLflow experiment per pipeline experiment (``cfg.name``); one run per stage
execution, named after the stage and tagged ``pipeline.stage``; every run of one workflow execution
shares the tag ``pipeline.execution`` (Snakemake sets ``PIPELINE_EXECUTION_ID`` once per execution),
so a whole execution is one filter away::

    mlflow.search_runs(experiment_names=["demo"], filter_string="tags.`pipeline.execution` = '<id>'")

The default store is ``sqlite:///<project root>/mlflow.db``: embedded, no server (MLflow 3 refuses
the old ``./mlruns`` file store by default). ``MLFLOW_TRACKING_URI`` points elsewhere, e.g. a team's
``mlflow server``. Browse with ``mlflow ui --backend-store-uri sqlite:///mlflow.db``.
"""

from __future__ import annotations

import fcntl
import os
import tempfile
import uuid
from collections.abc import Mapping
from contextlib import contextmanager, nullcontext
from pathlib import Path

import mlflow
from mlflow.entities import Param
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient
from mlflow.utils.validation import MAX_ENTITY_KEY_LENGTH, MAX_PARAM_VAL_LENGTH, MAX_PARAMS_TAGS_PER_BATCH
from omegaconf import DictConfig, OmegaConf

EXECUTION_ENV = "PIPELINE_EXECUTION_ID"
EXECUTION_TAG = "pipeline.execution"
STAGE_TAG = "pipeline.stage"
TRUNCATED = "...[truncated]"


def project_root() -> Path:
    """The source checkout (the folder holding ``pyproject.toml`` above this package), else the cwd."""
    root = Path(__file__).resolve().parents[1]
    return root if (root / "pyproject.toml").exists() else Path.cwd()


def tracking_uri() -> str:
    """``MLFLOW_TRACKING_URI`` if set, else the project's embedded ``sqlite:///.../mlflow.db``."""
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{project_root() / 'mlflow.db'}"


def _plain(config) -> object:
    if isinstance(config, DictConfig):
        return OmegaConf.to_container(config, resolve=True, enum_to_str=True)
    return config


def flatten_config(config, prefix: str = "") -> dict[str, str]:
    """Flatten a nested config into MLflow params: ``{"model.d_model": "128", ...}``.

    Nested keys are joined with ``.``; lists are kept whole as their string form
    (``"['g', 'q', 't']"``), which is how they are compared in the MLflow UI. Values longer than
    MLflow's limit are cut and marked (the full config is always logged as ``config.yaml`` too).
    """
    flat: dict[str, str] = {}
    for key, value in _plain(config).items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            flat.update(flatten_config(value, prefix=f"{name}."))
            continue
        text = str(value)
        if len(text) > MAX_PARAM_VAL_LENGTH:
            text = text[: MAX_PARAM_VAL_LENGTH - len(TRUNCATED)] + TRUNCATED
        flat[name[:MAX_ENTITY_KEY_LENGTH]] = text
    return flat


def _sqlite_lock(uri: str):
    """An exclusive lock beside a sqlite database file, or no lock for other stores."""
    if not uri.startswith("sqlite:///"):
        return nullcontext()
    database = Path(uri.removeprefix("sqlite:///"))
    database.parent.mkdir(parents=True, exist_ok=True)

    @contextmanager
    def lock():
        with open(database.with_name(database.name + ".lock"), "w") as handle:
            fcntl.flock(handle, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)

    return lock()


def ensure_experiment(name: str, uri: str | None = None) -> str:
    """Create the tracking store (schema migrations) and the experiment once; return its id.

    Several stage processes may start at once against a fresh ``mlflow.db``: for sqlite the first
    creation happens under a file lock, so none of them races the schema or the experiment. Other
    stores tolerate a concurrent create by fetching the experiment the other process made.
    """
    uri = uri or tracking_uri()
    with _sqlite_lock(uri):
        client = MlflowClient(uri)
        experiment = client.get_experiment_by_name(name)
        if experiment is not None:
            return experiment.experiment_id
        try:
            return client.create_experiment(name)
        except MlflowException:
            experiment = client.get_experiment_by_name(name)
            if experiment is None:
                raise
            return experiment.experiment_id


@contextmanager
def stage_run(experiment: str, stage: str, config, *, tags: Mapping[str, str] | None = None):
    """One MLflow run for one stage execution; yields the active run.

    Logs the flattened config as params and the resolved config as ``config.yaml``; tags the run
    with the stage and the execution id (taken from ``PIPELINE_EXECUTION_ID``, or made and exported
    so child processes share it). The run ends FINISHED, or FAILED if the block raises.
    """
    uri = tracking_uri()
    mlflow.set_tracking_uri(uri)
    experiment_id = ensure_experiment(experiment, uri)
    execution = os.environ.setdefault(EXECUTION_ENV, uuid.uuid4().hex)
    run_tags = {STAGE_TAG: stage, EXECUTION_TAG: execution, **(tags or {})}
    with mlflow.start_run(experiment_id=experiment_id, run_name=stage, tags=run_tags) as run:
        params = [Param(key, value) for key, value in flatten_config(config).items()]
        client = MlflowClient(uri)
        for start in range(0, len(params), MAX_PARAMS_TAGS_PER_BATCH):
            client.log_batch(run.info.run_id, params=params[start : start + MAX_PARAMS_TAGS_PER_BATCH])
        with tempfile.TemporaryDirectory() as folder:
            resolved = Path(folder) / "config.yaml"
            resolved.write_text(OmegaConf.to_yaml(OmegaConf.create(_plain(config))))
            mlflow.log_artifact(str(resolved))
        yield run
