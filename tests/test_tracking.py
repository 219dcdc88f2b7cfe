"""pipeline.tracking: where runs go, what a stage run records, and many stages starting at once."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import mlflow
import pytest
import yaml
from mlflow.tracking import MlflowClient
from mlflow.utils.validation import MAX_ENTITY_KEY_LENGTH, MAX_PARAM_VAL_LENGTH
from omegaconf import OmegaConf

from conftest import TINY, mlflow_ui, run_stage
from pipeline import tracking
from pipeline.tracking import (
    EXECUTION_ENV,
    EXECUTION_TAG,
    STAGE_TAG,
    TRUNCATION_MARKER,
    Interrupted,
    flatten_config,
    stage_run,
    tracking_uri,
)

REPO_ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def shared_db(tmp_path_factory) -> Path:
    """One sqlite store for the in-process tests (its schema takes seconds to create)."""
    return tmp_path_factory.mktemp("mlflow") / "mlflow.db"


@pytest.fixture
def store(shared_db, monkeypatch) -> str:
    """Point MLflow at the shared store; undo the execution id ``stage_run`` exports."""
    uri = f"sqlite:///{shared_db}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    # set-then-delete so monkeypatch restores the variable's absence after stage_run sets it
    monkeypatch.setenv(EXECUTION_ENV, "unset")
    monkeypatch.delenv(EXECUTION_ENV)
    return uri


def test_default_uri_is_sqlite_at_project_root(monkeypatch, tmp_path):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.chdir(tmp_path)
    assert tracking_uri() == f"sqlite:///{REPO_ROOT / 'mlflow.db'}"


def test_installed_package_defaults_to_cwd(monkeypatch, tmp_path):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    site_packages = tmp_path / "site-packages"
    monkeypatch.setattr(tracking, "__file__", str(site_packages / "pipeline" / "tracking.py"))
    monkeypatch.chdir(tmp_path)
    assert tracking_uri() == f"sqlite:///{tmp_path / 'mlflow.db'}"


def test_env_var_overrides_uri(monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:5000")
    assert tracking_uri() == "http://127.0.0.1:5000"


def test_flatten_joins_nested_keys_and_resolves():
    config = OmegaConf.create(
        {
            "name": "demo",
            "model": {"width": 64, "dims": [64, 64], "blocks": [{"heads": 4}, {"heads": 8}]},
            "train": {"lr": 1e-3, "width": "${model.width}", "resume": None, "extra": {}},
        }
    )
    assert flatten_config(config) == {
        "name": "demo",
        "model.width": "64",
        "model.dims": "[64, 64]",
        "model.blocks.0.heads": "4",
        "model.blocks.1.heads": "8",
        "train.lr": "0.001",
        "train.width": "64",
        "train.resume": "None",
        "train.extra": "{}",
    }


def test_flatten_respects_mlflow_limits():
    long_key = "k" * (MAX_ENTITY_KEY_LENGTH + 50)
    flat = flatten_config({"text": "x" * (MAX_PARAM_VAL_LENGTH + 1), long_key: {"a": 1, "b": 2}})
    assert len(flat["text"]) == MAX_PARAM_VAL_LENGTH
    assert flat["text"].endswith(TRUNCATION_MARKER)
    long_keys = [key for key in flat if key != "text"]
    assert len(long_keys) == 2  # both survive, distinct
    assert all(len(key) <= MAX_ENTITY_KEY_LENGTH for key in long_keys)


def test_every_param_arrives_past_the_batch_limit(store):
    config = {
        "layers": {f"layer_{index:03d}": {"width": index} for index in range(250)},
        "notes": "y" * (MAX_PARAM_VAL_LENGTH + 100),
    }
    with stage_run("params", "train", config) as run:
        pass
    logged = MlflowClient(store).get_run(run.info.run_id).data.params
    assert len(logged) == 251
    assert logged == flatten_config(config)


def test_run_is_tagged_and_execution_id_is_exported(store):
    with stage_run("tags", "sample", {"seed": 1}, tags={"owner": "test"}) as run:
        exported = os.environ[EXECUTION_ENV]
    finished = MlflowClient(store).get_run(run.info.run_id)
    assert finished.info.status == "FINISHED"
    assert finished.info.run_name == "sample"
    assert finished.data.tags[STAGE_TAG] == "sample"
    assert finished.data.tags[EXECUTION_TAG] == exported
    assert finished.data.tags["owner"] == "test"


def test_failing_body_marks_run_failed_and_reraises(store):
    with pytest.raises(RuntimeError, match="boom"):
        with stage_run("failures", "train", {"seed": 1}) as run:
            raise RuntimeError("boom")
    assert MlflowClient(store).get_run(run.info.run_id).info.status == "FAILED"
    assert mlflow.active_run() is None


def test_a_stop_signal_ends_the_run_killed_wherever_the_stage_is(store):
    def stay_alive(number, frame):  # if stage_run installed no handler, the signal lands here, not on pytest
        received.append(number)

    received = []
    previous = signal.signal(signal.SIGTERM, stay_alive)
    try:
        with pytest.raises(Interrupted) as raised:
            with stage_run("signals", "preprocess", {"seed": 1}) as run:
                os.kill(os.getpid(), signal.SIGTERM)
                time.sleep(10)  # interrupted: the handler runs as soon as the signal arrives
        assert raised.value.code == 128 + signal.SIGTERM and not received
        assert signal.getsignal(signal.SIGTERM) is stay_alive  # the handler before the stage is back
    finally:
        signal.signal(signal.SIGTERM, previous)
    assert MlflowClient(store).get_run(run.info.run_id).info.status == "KILLED"
    assert mlflow.active_run() is None


@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")  # the dropped exception, on purpose
def test_a_stop_signal_whose_exception_python_drops_still_ends_the_stage_killed(store):
    """A signal handler's exception raised while Python runs a ``__del__`` (or a weakref callback,
    as happened during training's set-up) is printed and dropped; the stage must stop all the same,
    and training must not begin (its loop would save an untrained checkpoint)."""
    from pipeline.train import StopRequest

    class SignalledWhileCollected:
        def __del__(self):
            os.kill(os.getpid(), signal.SIGTERM)  # the handler runs here, inside __del__

    previous = signal.getsignal(signal.SIGTERM)
    trained = False
    with pytest.raises(Interrupted) as raised:
        with stage_run("signals", "train", {"seed": 1}) as run:
            SignalledWhileCollected()  # collected at once: Python prints "Exception ignored in ..."
            with StopRequest():  # where the training loop begins
                trained = True
    assert raised.value.code == 128 + signal.SIGTERM and not trained
    assert signal.getsignal(signal.SIGTERM) is previous
    assert MlflowClient(store).get_run(run.info.run_id).info.status == "KILLED"


def test_a_stop_signal_that_comes_out_as_another_error_still_ends_the_stage_killed(store):
    """A signal handler's exception raised inside a C callback (h5py iterating a file's attributes,
    as happened during training's set-up) comes out of it as a ``SystemError``: the stage still
    stops as stopped, with the signal's exit code and its run KILLED, not FAILED."""
    with pytest.raises(Interrupted) as raised:
        with stage_run("signals", "train", {"seed": 1}) as run:
            try:
                os.kill(os.getpid(), signal.SIGTERM)
                time.sleep(10)  # interrupted: the handler raises here
            except Interrupted as error:  # what the C callback does with it
                raise SystemError("returned a result with an exception set") from error
    assert raised.value.code == 128 + signal.SIGTERM
    assert MlflowClient(store).get_run(run.info.run_id).info.status == "KILLED"


def test_config_artifact_round_trips_beside_the_db(store, shared_db, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # artifacts must not land under the cwd
    config = OmegaConf.create(
        {"name": "demo", "model": {"width": 8, "dims": [1, 2]}, "copy": "${model.width}"}
    )
    with stage_run("artifacts", "train", config) as run:
        pass
    assert run.info.artifact_uri.startswith((shared_db.parent / "mlartifacts").as_uri())
    local = mlflow.artifacts.download_artifacts(
        run_id=run.info.run_id, artifact_path="config.yaml", dst_path=str(tmp_path)
    )
    assert yaml.safe_load(Path(local).read_text()) == OmegaConf.to_container(config, resolve=True)
    assert not (tmp_path / "mlruns").exists()


def test_deleted_experiment_says_how_to_restore(store):
    client = MlflowClient(store)
    client.delete_experiment(client.create_experiment("deleted"))
    with pytest.raises(RuntimeError, match="mlflow experiments restore"):
        with stage_run("deleted", "train", {}):
            pass


STAGE_PROCESS = textwrap.dedent(
    """
    import sys
    import mlflow
    from pipeline.tracking import stage_run

    stage = sys.argv[1]
    with stage_run("concurrent", stage, {"stage": stage, "model": {"width": 8}}):
        for step in range(STEPS):
            mlflow.log_metric("loss", 1.0 / (step + 1), step=step)
            mlflow.log_metric("accuracy", step / STEPS, step=step)
    """
)


def test_concurrent_stages_share_one_fresh_store(tmp_path):
    """Six stage processes start at once against a fresh sqlite store: all must succeed and
    every metric must arrive (this fails without the lock around store creation)."""
    processes, steps, execution = 6, 20, "concurrency-test"
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    env = {
        **os.environ,
        "MLFLOW_TRACKING_URI": uri,
        EXECUTION_ENV: execution,
        "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")])),
    }
    code = STAGE_PROCESS.replace("STEPS", str(steps))
    stages = [f"stage_{index}" for index in range(processes)]
    started = [
        subprocess.Popen(
            [sys.executable, "-c", code, stage],
            env=env,
            cwd=tmp_path,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for stage in stages
    ]
    for stage, process in zip(stages, started):
        _, stderr = process.communicate(timeout=120)
        assert process.returncode == 0, f"{stage} failed:\n{stderr}"

    client = MlflowClient(uri)
    runs = client.search_runs(
        [client.get_experiment_by_name("concurrent").experiment_id],
        filter_string=f"tags.`{EXECUTION_TAG}` = '{execution}'",
    )
    assert sorted(run.data.tags[STAGE_TAG] for run in runs) == stages
    for run in runs:
        assert run.info.status == "FINISHED"
        for metric in ("loss", "accuracy"):
            history = client.get_metric_history(run.info.run_id, metric)
            assert sorted(point.step for point in history) == list(range(steps))


def test_experiment_created_by_a_racing_process_is_reused(store, monkeypatch):
    """Another process creates the experiment between our lookup and our create (a server
    store has no file lock): the create's "already exists" error is caught and the winner's
    experiment used."""
    winner = MlflowClient(store).create_experiment("raced")
    lookup = MlflowClient.get_experiment_by_name
    lookups = []

    def stale_first_lookup(client, name):
        lookups.append(name)
        return None if len(lookups) == 1 else lookup(client, name)

    monkeypatch.setattr(MlflowClient, "get_experiment_by_name", stale_first_lookup)
    assert tracking.ensure_experiment("raced", store) == winner
    assert len(lookups) == 2


def test_experiments_are_tagged_as_model_training(store):
    """MLflow's experiment type tag says model training (mlflow.experimentKind =
    custom_model_development), on a new experiment and on one made before the tag existed."""
    made = MlflowClient(store).get_experiment(tracking.ensure_experiment("fresh", store))
    older = MlflowClient(store).create_experiment("older")
    assert tracking.ensure_experiment("older", store) == older
    for experiment in (made, MlflowClient(store).get_experiment(older)):
        assert experiment.tags["mlflow.experimentKind"] == "custom_model_development", experiment.name


@pytest.mark.slow
def test_the_readme_mlflow_ui_serves_the_store_and_stages_log_through_it_as_to_a_team_server(tmp_path):
    """`MLFLOW_SERVER_ENABLE_JOB_EXECUTION=false mlflow ui --backend-store-uri sqlite:///mlflow.db` as the
    README shows it (on a free port), and a stage pointed at it with MLFLOW_TRACKING_URI=http://...:
    the run, its metrics and its config artifact arrive in the store behind the server."""
    with mlflow_ui("sqlite:///mlflow.db", cwd=tmp_path) as uri:
        client = MlflowClient(uri)
        result = run_stage("toy", *TINY, f"results_dir={tmp_path / 'results'}", env={"MLFLOW_TRACKING_URI": uri})
        assert result.returncode == 0, result.stderr
        [run] = client.search_runs([client.get_experiment_by_name("demo").experiment_id])
        assert run.data.tags[STAGE_TAG] == "toy" and run.data.params["train.steps"] == "30"
        # It trains toy.steps steps on the rings, not train.steps: its last loss is logged at step 19.
        assert max(point.step for point in client.get_metric_history(run.info.run_id, "loss_bpd")) == 19
        assert "inside_square" in run.data.metrics
        assert "config.yaml" in {artifact.path for artifact in client.list_artifacts(run.info.run_id)}
    assert (tmp_path / "mlflow.db").is_file()
