"""What a stopped, failed or repeated stage leaves behind: no MLflow run left RUNNING, no record that
describes outputs other than those beside it, no summary that forgets what earlier runs found."""

import json
import signal
import subprocess
import sys
import time

import mlflow
import numpy as np
import pytest

from conftest import PROJECT_ROOT, TINY, run_stage
from jet_files import processed_dataset, random_jets, write_root
from pipeline.checkpoints import latest_checkpoint_step

TRAIN = [*TINY, "train.val_every=3", "train.checkpoint_every=3", "train.val_jets=16"]


@pytest.fixture(scope="module")
def processed(tmp_path_factory):
    """A small processed dataset (3 classes x 40 jets)."""
    return processed_dataset(tmp_path_factory.mktemp("data"))


def start_training(results, processed, *overrides) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "pipeline.train", f"results_dir={results}", f"data.processed_dir={processed}", *TRAIN, *overrides],
        cwd=PROJECT_ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )


def test_sigterm_while_training_sets_up_ends_its_mlflow_run_killed(tmp_path, processed):
    process = start_training(tmp_path, processed)
    run_id_file = tmp_path / "train" / "mlflow_run_id"  # written as soon as the stage's run is open
    deadline = time.monotonic() + 300
    while not run_id_file.exists() and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    assert run_id_file.exists(), f"no {run_id_file}; the stage exited with {process.poll()}"
    process.send_signal(signal.SIGTERM)  # now loading the data, building the model, compiling
    _, stderr = process.communicate(timeout=300)
    assert process.returncode == 128 + signal.SIGTERM, stderr
    assert latest_checkpoint_step(tmp_path / "train") is None  # stopped before the training loop
    assert mlflow.get_run(run_id_file.read_text().strip()).info.status == "KILLED"
    assert not (tmp_path / "train" / "config.yaml").exists()  # it describes outputs; there are none


@pytest.mark.slow
def test_sigusr1_in_the_training_loop_saves_the_step_reached_and_the_next_run_resumes_there(tmp_path, processed):
    """SLURM's warning before the time limit (``--signal=USR1``): save, end the run KILLED, resume later."""
    process = start_training(tmp_path, processed, "train.steps=100000")
    deadline = time.monotonic() + 300
    while latest_checkpoint_step(tmp_path / "train") is None and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)  # the first checkpoint (step 3) means the loop is running
    assert process.poll() is None, process.communicate()[1]
    process.send_signal(signal.SIGUSR1)
    _, stderr = process.communicate(timeout=300)
    assert process.returncode == 128 + signal.SIGUSR1, stderr
    stopped_at = latest_checkpoint_step(tmp_path / "train")
    assert 3 <= stopped_at < 100000
    run_id = (tmp_path / "train" / "mlflow_run_id").read_text().strip()
    assert mlflow.get_run(run_id).info.status == "KILLED"
    resumed = run_stage("train", f"results_dir={tmp_path}", f"data.processed_dir={processed}", *TRAIN, f"train.steps={stopped_at + 3}")
    assert resumed.returncode == 0, resumed.stderr
    assert f"resuming from the checkpoint of step {stopped_at}" in resumed.stdout
    assert latest_checkpoint_step(tmp_path / "train") == stopped_at + 3


@pytest.mark.slow
def test_running_a_finished_training_again_keeps_its_best_val_nelbo(tmp_path, processed):
    first = run_stage("train", f"results_dir={tmp_path}", f"data.processed_dir={processed}", *TRAIN, "train.steps=6")
    assert first.returncode == 0, first.stderr
    summary = json.loads((tmp_path / "train" / "checkpoint.json").read_text())
    assert np.isfinite(summary["best_val_nelbo_bpd"]) and summary["best"].endswith(("/3", "/6"))
    again = run_stage("train", f"results_dir={tmp_path}", f"data.processed_dir={processed}", *TRAIN, "train.steps=6")
    assert again.returncode == 0, again.stderr
    assert "nothing to do" in again.stdout
    assert json.loads((tmp_path / "train" / "checkpoint.json").read_text()) == summary


def test_a_preprocess_failing_into_a_folder_of_older_sets_leaves_their_config(tmp_path):
    raw, processed = tmp_path / "raw", tmp_path / "processed"
    raw.mkdir()
    rng = np.random.default_rng(0)
    for name in ("g", "q", "t"):
        write_root(raw / f"{name}_000.root", random_jets(rng, 10), {f"label_{other}": [other == name] * 10 for other in "gqtwz"})
    overrides = [f"data.raw_dir={raw}", f"data.processed_dir={processed}", "data.generator.n_shards=1"]
    assert run_stage("preprocess", *overrides).returncode == 0
    before = {path.name: path.read_bytes() for path in processed.iterdir()}
    assert {"config.yaml", "train.h5", "normalisation.json"} <= before.keys()

    (raw / "q_000.root").write_text("this is not a data file\n")
    result = run_stage("preprocess", *overrides, "data.n_max=20")  # other settings, and a raw file that fails
    assert result.returncode == 2 and "q_000.root" in result.stderr
    after = {path.name: path.read_bytes() for path in processed.iterdir()}
    assert after == before  # the old sets and the config that made them (n_max 30), byte for byte; no partial file
