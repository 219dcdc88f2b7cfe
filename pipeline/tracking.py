"""The project's one MLflow helper: where runs go, and the run around each stage execution.

Tracking model:

- one MLflow experiment per pipeline experiment (the config's ``name``);
- one MLflow run per stage execution, named after the stage (plus what part of the work it did,
  ``generate g/0``, or the results folder of a sweep point, see :func:`pipeline.stage.stage`) and
  tagged ``pipeline.stage``;
- the files a stage read and wrote are the run's datasets (:func:`log_files`), with contexts
  ``read`` and ``written`` and a digest of their bytes: the train run that read ``train.h5`` shows
  the digest that the preprocess run wrote, so the UI shows the lineage from raw files to metrics;
- every run of one workflow execution carries the same ``pipeline.execution`` tag. Snakemake sets
  ``PIPELINE_EXECUTION_ID`` once per execution and every stage inherits it, so one filter finds
  the whole execution::

      mlflow.search_runs(experiment_names=["demo"],
                         filter_string="tags.`pipeline.execution` = '<id>'")

A run's params are the flattened resolved config (:func:`flatten_config`), its artifacts start
with that config whole as ``config.yaml``; the stage logs its metrics (with steps) and plots into
the active run.

The default store is ``sqlite:///<project root>/mlflow.db``: embedded, no server (MLflow 3 refuses
the old ``./mlruns`` file store by default), with artifacts in ``mlartifacts/`` beside it.
``MLFLOW_TRACKING_URI`` points elsewhere, e.g. a team's ``mlflow server``. Browse the default store
with ``MLFLOW_SERVER_ENABLE_JOB_EXECUTION=false mlflow ui --backend-store-uri sqlite:///mlflow.db`` from the
project root (README: the variable skips MLflow's job runner, which nothing here uses).

Concurrency: Snakemake starts several stages at once. The first process to reach a fresh sqlite
database creates its schema (dozens of migrations) and the experiment while holding an exclusive
lock on ``mlflow.db.lock``; the others wait, then find both made. After that, concurrent writes are
MLflow's business: every SQLAlchemy session it opens on sqlite sets ``PRAGMA busy_timeout = 20000``,
so a writer waits up to 20 s for another's transaction instead of failing with "database is
locked" (``tests/test_tracking.py`` checks this with several processes logging metrics at once).
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import signal
import threading
import uuid
import warnings
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from urllib.parse import quote

import mlflow
from mlflow.data.dataset_source_registry import resolve_dataset_source
from mlflow.data.meta_dataset import MetaDataset
from mlflow.entities import Param, Run, RunStatus
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import RESOURCE_ALREADY_EXISTS, ErrorCode
from mlflow.tracking import MlflowClient
from omegaconf import OmegaConf
from sqlalchemy.engine import make_url

from .files import file_sha256

try:
    from mlflow.utils.validation import (
        MAX_ENTITY_KEY_LENGTH,
        MAX_PARAM_VAL_LENGTH,
        MAX_PARAMS_TAGS_PER_BATCH,
    )
except ImportError:  # an MLflow that moved its private constants: the limits MLflow 3 documents
    MAX_ENTITY_KEY_LENGTH, MAX_PARAM_VAL_LENGTH, MAX_PARAMS_TAGS_PER_BATCH = 250, 6000, 100

EXECUTION_ENV = "PIPELINE_EXECUTION_ID"
EXECUTION_TAG = "pipeline.execution"
STAGE_TAG = "pipeline.stage"
CONFIG_ARTIFACT = "config.yaml"
# MLflow 3's experiment type: this pipeline's experiments are model training, not GenAI development.
# (Which pages the UI shows is its own switch, GenAI or Model training; the README gives the link.)
EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
EXPERIMENT_TAGS = {EXPERIMENT_KIND_TAG: "custom_model_development"}
TRUNCATION_MARKER = "...[truncated; full value in config.yaml]"


def project_root() -> Path:
    """The source checkout: the folder above the ``pipeline`` package when it holds
    ``pyproject.toml``, else (an installed package) the current working directory."""
    checkout = Path(__file__).resolve().parents[1]
    return checkout if (checkout / "pyproject.toml").is_file() else Path.cwd()


def tracking_uri() -> str:
    """``MLFLOW_TRACKING_URI`` if set, else ``sqlite:///<project root>/mlflow.db`` (absolute)."""
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{project_root() / 'mlflow.db'}"


def _resolved(config: Mapping) -> Mapping:
    """``config`` as plain containers, OmegaConf interpolations resolved."""
    return OmegaConf.to_container(config, resolve=True, enum_to_str=True) if OmegaConf.is_config(config) else config


def _is_list(value) -> bool:
    return isinstance(value, Sequence) and not isinstance(value, (str, bytes))


def _param_key(key: str) -> str:
    """``key`` if MLflow accepts its length, else its head plus a short hash of the whole key, so
    two long keys that share a head stay two params."""
    if len(key) <= MAX_ENTITY_KEY_LENGTH:
        return key
    digest = hashlib.sha1(key.encode()).hexdigest()[:8]
    return f"{key[: MAX_ENTITY_KEY_LENGTH - len(digest) - 1]}-{digest}"


def _param_value(value) -> str:
    """``str(value)``, cut to MLflow's limit with :data:`TRUNCATION_MARKER` at the end."""
    text = str(value)
    if len(text) <= MAX_PARAM_VAL_LENGTH:
        return text
    return text[: MAX_PARAM_VAL_LENGTH - len(TRUNCATION_MARKER)] + TRUNCATION_MARKER


def _flatten_into(flat: dict[str, str], key: str, value) -> None:
    if isinstance(value, Mapping) and value:
        for child_key, child in value.items():
            _flatten_into(flat, f"{key}.{child_key}", child)
    elif _is_list(value) and any(isinstance(item, Mapping) or _is_list(item) for item in value):
        for index, item in enumerate(value):
            _flatten_into(flat, f"{key}.{index}", item)
    else:
        flat[_param_key(key)] = _param_value(value)


def flatten_config(config: Mapping) -> dict[str, str]:
    """Flatten a nested config (a dict or an OmegaConf ``DictConfig``, resolved first) into
    MLflow params: ``{"model.d_model": "128", "data.classes": "['g', 'q']", ...}``.

    - Nested keys are joined with ``.``.
    - A list of scalars stays one param, its ``str`` (``"[64, 64, 64]"``): it reads as in the
      config and compares as one value across runs. A list holding mappings or lists is indexed
      instead: ``key.0.name``, ``key.1.name``, ...
    - Values are ``str(value)`` (as ``mlflow.log_param`` writes them: ``True``, ``None``); an
      empty mapping is the param ``{}``.
    - MLflow's limits hold: a value longer than ``MAX_PARAM_VAL_LENGTH`` is cut and ends with
      :data:`TRUNCATION_MARKER` (the whole config is logged as the ``config.yaml`` artifact, so
      nothing is lost); a key longer than ``MAX_ENTITY_KEY_LENGTH`` keeps its head plus a hash of
      the whole key.
    """
    flat: dict[str, str] = {}
    for key, value in _resolved(config).items():
        _flatten_into(flat, str(key), value)
    return flat


def _sqlite_path(uri: str) -> Path | None:
    """The database file of a ``sqlite:`` URI; None for other stores and in-memory sqlite."""
    if not uri.startswith("sqlite:"):
        return None
    database = make_url(uri).database
    return Path(database) if database and database != ":memory:" else None


@contextmanager
def _store_lock(database: Path | None) -> Iterator[None]:
    """Hold an exclusive ``flock`` on ``<database>.lock`` (no lock when there is no file)."""
    if database is None:
        yield
        return
    database.parent.mkdir(parents=True, exist_ok=True)
    with open(database.with_name(database.name + ".lock"), "a") as lock_file:
        fcntl.flock(lock_file, fcntl.LOCK_EX)
        yield  # closing the file releases the lock


def ensure_experiment(name: str, uri: str | None = None) -> str:
    """Create the tracking store (schema migrations) and the experiment ``name`` if missing;
    return the experiment's id.

    Safe when several processes start at once against a fresh store. With sqlite, all of it
    happens under an exclusive lock on ``<db>.lock`` beside the database, and the experiment's
    artifacts go to ``mlartifacts/<name>`` beside the database (not ``./mlruns`` under whatever
    directory the creating process ran in). With other stores a concurrent create is tolerated:
    the loser of the race fetches the winner's experiment.
    """
    uri = uri or tracking_uri()
    database = _sqlite_path(uri)
    with _store_lock(database):
        client = MlflowClient(uri)  # the process-wide store for ``uri``: made (and migrated) here
        experiment = client.get_experiment_by_name(name)
        if experiment is None:
            artifact_location = None
            if database is not None:
                artifacts = database.resolve().parent / "mlartifacts" / quote(name, safe="")
                artifact_location = artifacts.as_uri()
            try:
                return client.create_experiment(name, artifact_location=artifact_location, tags=EXPERIMENT_TAGS)
            except MlflowException as error:
                if error.error_code != ErrorCode.Name(RESOURCE_ALREADY_EXISTS):
                    raise
                experiment = client.get_experiment_by_name(name)
    if experiment.lifecycle_stage != "active":
        raise RuntimeError(
            f"MLflow experiment {name!r} (id {experiment.experiment_id}) is deleted in {uri}. "
            f"Restore it with `MLFLOW_TRACKING_URI={uri} mlflow experiments restore "
            f"--experiment-id {experiment.experiment_id}`, or remove it for good with "
            f"`mlflow gc --backend-store-uri {uri} --experiment-ids {experiment.experiment_id}`."
        )
    if experiment.tags.get(EXPERIMENT_KIND_TAG) is None:  # an experiment made before the kind was set
        MlflowClient(uri).set_experiment_tag(experiment.experiment_id, EXPERIMENT_KIND_TAG, EXPERIMENT_TAGS[EXPERIMENT_KIND_TAG])
    return experiment.experiment_id


def execution_id() -> str:
    """This workflow execution's id: ``PIPELINE_EXECUTION_ID``, or a new one exported there so
    child processes share it."""
    execution = os.environ.get(EXECUTION_ENV) or uuid.uuid4().hex
    os.environ[EXECUTION_ENV] = execution
    return execution


READ, WRITTEN = "read", "written"  # a logged dataset's context: what the stage read, what it wrote


class FileDataset(MetaDataset):
    """A file that a stage read or wrote, as an MLflow dataset.

    Its name is its path from the working directory (the project root, where Snakemake runs every
    stage) when it lies inside it; its digest the first 16 hex digits of the SHA-256 of its bytes,
    so the file one run wrote and the next one read show the same digest: the lineage (a download
    keeps the checksum it was verified with, of whatever algorithm); its source the absolute path;
    its profile the number of jets it holds, where known."""

    def __init__(self, path: str | os.PathLike, jets: int | None = None, known_hash: str | None = None):
        """``known_hash``: a hex digest of the file's bytes that the stage has already computed
        (``sha256:<hex>`` or ``<hex>``, as pooch writes it), so a large file is not read again."""
        path = Path(path).resolve()
        digest = (known_hash or file_sha256(path)).split(":")[-1]
        here = Path.cwd().resolve()
        name = str(path.relative_to(here)) if path.is_relative_to(here) else str(path)
        self._jets = jets
        super().__init__(_local_source(path), name=name, digest=digest[:16])

    @property
    def profile(self) -> dict | None:
        return None if self._jets is None else {"jets": self._jets}

    def to_dict(self) -> dict[str, str]:
        config = super().to_dict()
        if self.profile is not None:
            config["profile"] = json.dumps(self.profile)
        return config


def _local_source(path: Path):
    """MLflow's dataset source for a local file. MLflow registers one source class for plain paths
    and one for ``file:`` URIs, both local, and warns that a path matches both; either is right."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="The specified dataset source can be interpreted in multiple ways")
        return resolve_dataset_source(str(path))


def log_files(context: str, files: Sequence[FileDataset]) -> None:
    """Log ``files`` as datasets of the active run, in ``context`` (:data:`READ` or
    :data:`WRITTEN`): the MLflow UI lists them in the run's Dataset column."""
    if files:
        mlflow.log_inputs(list(files), contexts=[context] * len(files), tags_list=[None] * len(files))


STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)  # what SLURM sends before preemption or the time limit


class Interrupted(SystemExit):
    """A stage stopped on request (SIGTERM, SIGUSR1), having saved whatever it saves to resume: its
    MLflow run ends KILLED, not FAILED, and the process exits with ``code`` (128 + the signal)."""


_received_stop_signals: list[int] = []  # stop signals received while the current stage runs


def _interrupt(number: int, frame) -> None:
    """Stop the stage at once: raise :class:`Interrupted`. Later stop signals are ignored, so a
    second SIGTERM cannot cut short the ending of the MLflow run. The signal is also remembered
    (:func:`received_stop_signal`): when it arrives while Python runs a weakref callback or a
    ``__del__``, the exception is printed and dropped there, and the stage must still stop."""
    for stop_signal in STOP_SIGNALS:
        signal.signal(stop_signal, signal.SIG_IGN)
    _received_stop_signals.append(number)
    raise Interrupted(128 + number)


def received_stop_signal() -> int | None:
    """The stop signal received since the stage began, if any (its exception may have been dropped)."""
    return _received_stop_signals[0] if _received_stop_signals else None


@contextmanager
def _stop_signals_interrupt() -> Iterator[None]:
    """While the block runs, :data:`STOP_SIGNALS` raise :class:`Interrupted` instead of killing the
    process; the previous handlers come back after it. Signal handlers belong to the main thread,
    so elsewhere the block runs with the handlers as they are."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    _received_stop_signals.clear()
    previous = {stop_signal: signal.signal(stop_signal, _interrupt) for stop_signal in STOP_SIGNALS}
    try:
        yield
    finally:
        for stop_signal, handler in previous.items():
            signal.signal(stop_signal, handler)


@contextmanager
def stage_run(
    experiment: str, run_name: str, config: Mapping, *, stage: str | None = None,
    tags: Mapping[str, str] | None = None, resume_run_id: str | None = None,
) -> Iterator[Run]:
    """Run one stage execution inside an MLflow run; yields the active run.

    Points MLflow at :func:`tracking_uri`, makes the store and the experiment if needed
    (:func:`ensure_experiment`), and starts a run named ``run_name`` tagged with ``tags``,
    ``pipeline.stage`` (``stage``, default ``run_name``) and ``pipeline.execution`` (:func:`execution_id`). Logs the flattened
    config as params, in batches within MLflow's per-request limit, and the resolved config as the
    artifact ``config.yaml``. The run ends FINISHED, or FAILED when the block raises (KILLED on
    Ctrl-C or :class:`Interrupted`); the exception propagates. ``resume_run_id`` continues that
    run instead (a resumed training): its params stay as first logged.

    SIGTERM and SIGUSR1 raise :class:`Interrupted` wherever the stage is (loading data, compiling,
    writing), so a stopped stage never leaves its run RUNNING; a stage that saves its progress
    first (the training loop) installs its own handler for that part and restores this one.
    """
    uri = tracking_uri()
    mlflow.set_tracking_uri(uri)
    experiment_id = ensure_experiment(experiment, uri)
    run_tags = {**(tags or {}), STAGE_TAG: stage or run_name, EXECUTION_TAG: execution_id()}
    with _stop_signals_interrupt():
        try:
            if resume_run_id is not None:
                run = mlflow.start_run(run_id=resume_run_id, tags=run_tags)
            else:
                run = mlflow.start_run(experiment_id=experiment_id, run_name=run_name, tags=run_tags)
                params = [Param(key, value) for key, value in flatten_config(config).items()]
                client = MlflowClient(uri)
                for start in range(0, len(params), MAX_PARAMS_TAGS_PER_BATCH):
                    batch = params[start : start + MAX_PARAMS_TAGS_PER_BATCH]
                    client.log_batch(run.info.run_id, params=batch)
            mlflow.log_text(OmegaConf.to_yaml(_resolved(config)), CONFIG_ARTIFACT)
            yield run
            if (number := received_stop_signal()) is not None:  # its exception was dropped on the way
                raise Interrupted(128 + number)
        except BaseException as error:  # ends the run if it started (no-op otherwise)
            # A stop signal's exception raised inside C code (an h5py callback) can come out as
            # another error; after a stop signal, whatever propagates is the stop.
            number = received_stop_signal()
            interrupted = isinstance(error, (KeyboardInterrupt, Interrupted)) or number is not None
            mlflow.end_run(RunStatus.to_string(RunStatus.KILLED if interrupted else RunStatus.FAILED))
            if number is not None and not isinstance(error, Interrupted):
                raise Interrupted(128 + number) from error
            raise
        mlflow.end_run(RunStatus.to_string(RunStatus.FINISHED))
