"""Training stage: device-count equivalence, resume after SIGTERM, NaN guard and the resume with a
lower learning rate it advises, padding-aware batches, and two processes joined with jax.distributed.
Several CPU devices are simulated with XLA_FLAGS."""

import importlib.util
import json
import os
import re
import signal
import subprocess
import sys
import tracemalloc

import h5py
import jax
import mlflow
import numpy as np
import pytest
from omegaconf import OmegaConf

from conftest import FIXTURE_TRACKING_URI, PROJECT_ROOT, XLA_FLAGS, compose_config, free_port
from jet_files import processed_dataset
from pipeline.input_pipeline import SetsSplit, TrainBatches, batches_by_multiplicity, bucket_sizes
from pipeline.config import PARTICLE_FEATURES
from pipeline.model import build_vdm
from pipeline.sets import ROWS_PER_CHUNK, write_sets
from pipeline.checkpoints import latest_checkpoint_step, load_checkpoint
from pipeline.files import PipelineError
from pipeline import train as train_stage
from pipeline.train import RESUMABLE_CHANGES, TrainingPace
from setdiff import init_params, make_optimizer, vdm_loss

STEPS = 12
TRAIN = [
    "model.d_model=16", "model.n_layers=1", "model.n_heads=2", "train.batch_size=8", "train.warmup_steps=2",
    "train.log_every=2", "train.val_every=6", "train.checkpoint_every=6", "train.val_jets=16",
]


@pytest.fixture(scope="module")
def processed(tmp_path_factory):
    """A small processed dataset (3 classes x 40 jets, up to 14 particles, n_max 30)."""
    return processed_dataset(tmp_path_factory.mktemp("data"))


def train_batches(processed, batch_size, **options):
    """The training input of the processed split, as ``pipeline.train`` builds it, on one device."""
    return TrainBatches(processed / "train.h5", processed / "normalisation.json", False, False, batch_size, 0, 1, **options)


def synthetic_split(folder, n_jets, n_max=30, seed=0):
    """A train split of ``n_jets`` random jets (several HDF5 chunks) and its normalisation.json."""
    rng = np.random.default_rng(seed)
    multiplicity = rng.integers(1, n_max + 1, n_jets)
    mask = np.arange(n_max) < multiplicity[:, None]
    particles = np.where(mask[..., None], rng.random((n_jets, n_max, 3), dtype=np.float32), 0).astype(np.float32)
    with write_sets(folder / "train.h5", n_max=n_max, feature_names=PARTICLE_FEATURES, jet_feature_names=["pt", "eta", "mass", "n_particles"],
                    class_names=["g", "t"], source="test", config="") as writer:
        writer.append(particles, mask, rng.random((n_jets, 4), dtype=np.float32), rng.integers(0, 2, n_jets).astype(np.int32))
    statistics = {name: {"mean": 0.5, "std": 0.3} for name in PARTICLE_FEATURES}
    (folder / "normalisation.json").write_text(json.dumps({"particles": statistics}))
    return folder


def train(results, processed, *overrides, devices=1, env=None, wait=True):
    command = [sys.executable, "-m", "pipeline.train", f"results_dir={results}", f"data.processed_dir={processed}",
               f"train.steps={STEPS}", *TRAIN, *overrides]
    environment = {**os.environ, "XLA_FLAGS": f"{XLA_FLAGS} --xla_force_host_platform_device_count={devices}", **(env or {})}
    process = subprocess.Popen(command, cwd=PROJECT_ROOT, env=environment, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    if not wait:
        return process
    stdout, stderr = process.communicate(timeout=600)
    return subprocess.CompletedProcess(command, process.returncode, stdout, stderr)


def final_params(results, which="latest"):
    summary = json.loads((results / "train" / "checkpoint.json").read_text())
    return load_checkpoint(summary[which])["params"], summary


def assert_same_params(a, b, rtol=1e-5, atol=1e-6):
    """Equal to float32 tolerance. The attention key bias (the first half of ``key_value/bias``) is
    the exception: it shifts every logit of a query alike, so softmax makes its true gradient zero
    and what Adam does with the rounding noise left in it (~1e-5 steps) depends on the summation
    order; it is checked at that scale."""
    flat_a, flat_b = (dict(jax_leaves(tree)) for tree in (a, b))
    assert flat_a.keys() == flat_b.keys()
    for key in flat_a:
        if key.endswith("/key_value/bias"):
            half = flat_a[key].shape[-1] // 2
            np.testing.assert_allclose(flat_a[key][:half], flat_b[key][:half], rtol=rtol, atol=1e-4, err_msg=key)
            np.testing.assert_allclose(flat_a[key][half:], flat_b[key][half:], rtol=rtol, atol=atol, err_msg=key)
        else:
            np.testing.assert_allclose(flat_a[key], flat_b[key], rtol=rtol, atol=atol, err_msg=key)


def jax_leaves(tree, prefix=""):
    if isinstance(tree, dict):
        for key, value in tree.items():
            yield from jax_leaves(value, f"{prefix}/{key}")
    else:
        yield prefix, np.asarray(tree)


@pytest.fixture(scope="module")
def reference_run(tmp_path_factory, processed):
    """An uninterrupted one-device run of STEPS steps: its results folder and its output."""
    results = tmp_path_factory.mktemp("reference")
    result = train(results, processed)
    assert result.returncode == 0, result.stderr
    return results, result


@pytest.fixture(scope="module")
def reference(reference_run):
    return reference_run[0]


def test_the_log_shows_progress_and_no_noise(reference_run):
    """Not on a terminal, a line every train.log_every (2) steps with the mean loss since the last
    line, the throughput and the time left; nothing about backends this machine does not have."""
    results, result = reference_run
    lines = [line for line in result.stdout.splitlines() if re.match(r"train: step \d+/", line)]
    assert [line.split()[2] for line in lines] == [f"{step}/{STEPS}" for step in range(2, STEPS + 1, 2)]
    pattern = r"train: step \d+/12 loss (\d+\.\d+) bpd \(mean of 2 steps; last (\d+\.\d+)\), \d+ jets/s, ETA \d\d:\d\d$"
    assert all(re.match(pattern, line) for line in lines), lines
    assert lines[-1].endswith("ETA 00:00")
    assert "Unable to initialize backend" not in result.stdout + result.stderr

    # MLflow: the loss of the step logged as it is, and its mean over the steps since the last log.
    run_id = json.loads((results / "train" / "checkpoint.json").read_text())["mlflow_run_id"]
    client = mlflow.MlflowClient(FIXTURE_TRACKING_URI)  # module fixtures log there (conftest)
    smoothed = client.get_metric_history(run_id, "loss_bpd_smoothed")
    raw = client.get_metric_history(run_id, "loss_bpd")
    assert [metric.step for metric in smoothed] == [metric.step for metric in raw] == list(range(2, STEPS + 1, 2))
    logged_means = [float(re.match(pattern, line).group(1)) for line in lines]
    np.testing.assert_allclose([metric.value for metric in smoothed], logged_means, atol=1e-4)
    assert any(abs(mean.value - last.value) > 1e-4 for mean, last in zip(smoothed, raw))
    # The learned schedule's endpoints as they move, the last of them those the saved model samples with
    # (gamma(0) stays at its floor, model.gamma_min, where the loss pulls it lower, as it does when the model
    # reads log(pt_rel), the default).
    model = build_vdm(compose_config(*TRAIN).model, data_dim=3, n_classes=3)
    latest = json.loads((results / "train" / "checkpoint.json").read_text())["latest"]
    saved = model.apply(load_checkpoint(latest)["ema_params"], np.array([0.0, 1.0], np.float32), method=type(model).gamma)
    histories = {name: client.get_metric_history(run_id, name) for name in ("gamma_0", "gamma_1")}
    for history, value in zip(histories.values(), saved):
        assert [metric.step for metric in history] == list(range(2, STEPS + 1, 2))
        assert history[-1].value == pytest.approx(float(value), abs=1e-6)
    assert len({metric.value for metric in histories["gamma_1"]}) > 1


def test_the_time_left_leaves_out_the_interval_that_compiled_the_step():
    pace = TrainingPace()
    pace.add(10, 20.0)  # compilation and 10 steps
    assert pace.eta(100) == "03:20"  # nothing better known yet
    pace.add(10, 1.0)
    pace.add(10, 3.0)
    assert pace.eta(100) == "00:20"  # 0.2 s per step since


def test_four_devices_make_the_updates_of_one(tmp_path, processed, reference):
    result = train(tmp_path, processed, devices=4)
    assert result.returncode == 0, result.stderr
    four, summary = final_params(tmp_path)
    one, _ = final_params(reference)
    assert summary["step"] == STEPS
    assert_same_params(four, one)


def test_a_batch_that_does_not_divide_over_the_devices_is_refused(tmp_path, processed):
    result = train(tmp_path, processed, "train.batch_size=6", devices=4)
    assert result.returncode == 2
    assert "train.batch_size=6" in result.stderr and "4 devices" in result.stderr and "Traceback" not in result.stderr


@pytest.mark.parametrize("option", ["model.cond_drop=context", "model.context_pt_rel_sum=true", "model.context_kept_mass=true"])
def test_an_option_of_the_jet_context_without_the_context_is_refused(tmp_path, processed, option):
    """Dropping only the jet features, adding the kept momentum sum to them, or changing their mass to the kept
    particles' needs them."""
    cfg = compose_config(f"results_dir={tmp_path}", f"data.processed_dir={processed}", option, "model.use_jet_context=false")
    with pytest.raises(PipelineError, match=rf"{re.escape(option.split('=')[0])}.* set model\.use_jet_context=true"):
        train_stage.train(cfg, tmp_path / "train", primary=True, progress=False)
    assert not (tmp_path / "train").exists()


@pytest.mark.parametrize("option, message", [
    ("model.loss_weighting=elbo_plus_sigmoid", r"model\.loss_weighting=elbo_plus_sigmoid trains on a loss that is not the bound"),
    ("model.self_condition=true", r"model\.self_condition=true trains a learned schedule without the gradient"),
])
def test_an_option_that_needs_the_fixed_schedule_is_refused_on_the_learned_one(tmp_path, processed, option, message):
    cfg = compose_config(f"results_dir={tmp_path}", f"data.processed_dir={processed}", *TRAIN, option)
    assert cfg.model.schedule.value == "learned_linear"  # the default
    with pytest.raises(PipelineError, match=rf"^{message}.*set model\.schedule=fixed_linear\.$"):
        train_stage.train(cfg, tmp_path / "train", primary=True, progress=False)
    assert not (tmp_path / "train").exists()


@pytest.mark.slow
def test_sigterm_saves_and_the_same_command_resumes_to_the_same_parameters(tmp_path, processed):
    long = ["train.steps=300", "train.checkpoint_every=1000", "train.val_every=1000"]
    uninterrupted = train(tmp_path / "uninterrupted", processed, *long)
    assert uninterrupted.returncode == 0, uninterrupted.stderr
    process = train(tmp_path / "resumed", processed, *long, wait=False)
    for line in process.stdout:  # plain log lines (not a terminal): wait until training runs
        if "train: step 4/" in line:
            break
    process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate(timeout=300)
    assert process.returncode == 128 + signal.SIGTERM, stderr
    saved = sorted(int(path.name) for path in (tmp_path / "resumed" / "train" / "checkpoints" / "latest").iterdir())
    assert saved and 4 <= saved[-1] < 300
    result = train(tmp_path / "resumed", processed, *long)  # the same command again
    assert result.returncode == 0, result.stderr
    resumed, summary = final_params(tmp_path / "resumed")
    assert summary["step"] == 300
    assert_same_params(resumed, final_params(tmp_path / "uninterrupted")[0], rtol=1e-6, atol=1e-7)
    runs = mlflow.search_runs(experiment_names=["demo"], filter_string="tags.`pipeline.stage` = 'train'")
    resumed_runs = runs[runs["run_id"] == summary["mlflow_run_id"]]
    assert len(runs) == 2 and len(resumed_runs) == 1  # the resumed training continued its MLflow run
    assert resumed_runs["status"].iloc[0] == "FINISHED"


@pytest.mark.slow
def test_resuming_with_other_settings_is_refused_and_more_steps_continue(tmp_path, processed):
    assert train(tmp_path, processed, "train.steps=2").returncode == 0
    result = train(tmp_path, processed, "train.steps=4", "model.d_model=32")
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "model.d_model 16 -> 32" in result.stderr.strip().splitlines()[-1]
    result = train(tmp_path, processed, "train.steps=4")  # a longer run of the same settings resumes
    assert result.returncode == 0, result.stderr
    assert final_params(tmp_path)[1]["step"] == 4
    assert sorted(path.name for path in (tmp_path / "train" / "checkpoints" / "latest").iterdir()) == ["2", "4"]


def test_a_setting_added_to_the_pipeline_since_a_run_resumes_it_at_its_default(tmp_path):
    """A checkpointed run's config predates a model or train key: the run had the key's default, so
    the same settings resume it and another value of that key is refused; a key the pipeline no
    longer has is a change too."""
    cfg = compose_config(*TRAIN)
    saved = OmegaConf.to_container(cfg)
    del saved["model"]["context_kept_mass"], saved["train"]["grad_clip"]
    OmegaConf.save(saved, tmp_path / "config.yaml")
    assert train_stage.settings_changed_on_resume(tmp_path / "config.yaml", cfg) == {}
    with pytest.raises(PipelineError, match=r"other settings \(model\.context_kept_mass False -> True\)"):
        train_stage.settings_changed_on_resume(tmp_path / "config.yaml", compose_config(*TRAIN, "model.context_kept_mass=true"))
    saved["model"]["retired_option"] = 3
    OmegaConf.save(saved, tmp_path / "config.yaml")
    with pytest.raises(PipelineError, match=r"other settings \(model\.retired_option 3 -> unset\)"):
        train_stage.settings_changed_on_resume(tmp_path / "config.yaml", cfg)


@pytest.mark.slow
def test_a_nan_loss_stops_with_its_step_and_a_lower_learning_rate_resumes_from_the_last_good_checkpoint(tmp_path, processed):
    assert train(tmp_path, processed, "train.steps=6", "train.learning_rate=0.002").returncode == 0  # checkpoint 6
    result = train(tmp_path, processed, "train.learning_rate=1e30")  # step 7 throws the parameters far away
    assert result.returncode == 2
    message = result.stderr.strip().splitlines()[-1]
    assert "at step 8" in message and "checkpoint (step 6) is intact" in message and "Traceback" not in result.stderr
    assert "lower train.learning_rate" in message and "resume from it" in message
    restored = load_checkpoint(tmp_path / "train" / "checkpoints" / "latest" / "6")
    assert all(np.isfinite(leaf).all() for _, leaf in jax_leaves(restored["params"]))
    assert sorted(path.name for path in (tmp_path / "train" / "checkpoints" / "latest").iterdir()) == ["6"]

    result = train(tmp_path, processed, "train.learning_rate=1e-4")  # the advice, followed
    assert result.returncode == 0, result.stderr
    assert "resuming from the checkpoint of step 6; train.learning_rate 0.002 -> 0.0001; train.steps 6 -> 12" in result.stdout
    params, summary = final_params(tmp_path)
    assert summary["step"] == STEPS and all(np.isfinite(leaf).all() for _, leaf in jax_leaves(params))
    run = mlflow.get_run(summary["mlflow_run_id"])
    assert run.info.status == "FINISHED"
    assert run.data.params["train.learning_rate"] == "0.002"  # params keep their first values ...
    assert run.data.tags["resume.6.train.learning_rate"] == "0.002 -> 0.0001"  # ... the resume's change is recorded
    assert run.data.tags["resume.6.train.steps"] == "6 -> 12"
    assert len(mlflow.search_runs(experiment_names=["demo"])) == 1  # the NaN attempt and the resume continued one run
    saved = OmegaConf.load(tmp_path / "train" / "config.yaml")
    assert (saved.train.learning_rate, saved.train.steps) == (1e-4, STEPS)  # what the next resume compares against


def test_a_nan_loss_before_any_checkpoint_says_there_is_none(tmp_path, processed):
    """The training stage's loop, called in-process (the test above runs the command line)."""
    cfg = compose_config(f"results_dir={tmp_path}", f"data.processed_dir={processed}", f"train.steps={STEPS}", *TRAIN,
                         "train.learning_rate=1e30")  # checkpoints every 6 steps; NaN at step 3
    with mlflow.start_run(), pytest.raises(PipelineError) as refused:
        train_stage.train(cfg, tmp_path / "train", primary=True, progress=False)
    message = str(refused.value)
    assert "at step 3, before any checkpoint was written" in message and "start afresh" in message
    assert "intact" not in message
    assert latest_checkpoint_step(tmp_path / "train") is None


def test_the_optimiser_settings_a_resume_may_change_keep_the_optimiser_state_of_the_checkpoint():
    params = {"dense": {"kernel": np.ones((3, 2), np.float32), "bias": np.zeros(2, np.float32)}}
    arguments = {"learning_rate": 3e-4, "total_steps": 100, "warmup_steps": 10, "weight_decay": 1e-4, "grad_clip": 1.0}
    saved = jax.tree.structure(make_optimizer(**arguments).init(params))
    changes = [("train.learning_rate", "learning_rate", 1e-5), ("train.steps", "total_steps", 1_000),
               ("train.warmup_steps", "warmup_steps", 0), ("train.weight_decay", "weight_decay", 0.0),
               ("train.grad_clip", "grad_clip", 0.1)]
    for setting, argument, value in changes:
        assert setting in RESUMABLE_CHANGES
        assert jax.tree.structure(make_optimizer(**{**arguments, argument: value}).init(params)) == saved, setting


def test_padding_aware_batches_have_the_loss_of_fully_padded_ones(processed):
    cfg = compose_config(*TRAIN)
    cut, full = (train_batches(processed, 8, padding_aware=aware) for aware in (True, False))
    model = build_vdm(cfg.model, data_dim=3, n_classes=3)
    params = init_params(model, jax.random.PRNGKey(0), {name: array[0] for name, array in full(0).items()})
    for step in range(3):
        small, big = ({name: array[0] for name, array in batches(step).items()} for batches in (cut, full))
        assert small["x"].shape[1] < big["x"].shape[1] == 30  # the cut really happened
        losses = [vdm_loss(model, params, jax.random.PRNGKey(step), b["x"], b["mask"], b["labels"])[0] for b in (small, big)]
        np.testing.assert_allclose(losses[0], losses[1], rtol=1e-6)


def test_multiplicity_windows_group_similar_sets_and_still_see_each_once_per_epoch(processed):
    plain, grouped = (train_batches(processed, 8, multiplicity_window=window) for window in (0, 5))
    for epoch in range(2):
        rows = {name: batches.window_batches(epoch, 0) for name, batches in (("plain", plain), ("grouped", grouped))}
        assert sorted(rows["grouped"].ravel()) == sorted(rows["plain"].ravel())  # the same sets, each once
        assert len(set(rows["grouped"].ravel())) == rows["grouped"].size
        spread = {name: np.mean([np.ptp(plain.multiplicity[batch]) for batch in batch_rows]) for name, batch_rows in rows.items()}
        assert spread["grouped"] < 0.5 * spread["plain"]
    np.testing.assert_array_equal(grouped.window_batches(1, 0), train_batches(processed, 8, multiplicity_window=5).window_batches(1, 0))
    assert not np.array_equal(grouped.window_batches(0, 0), grouped.window_batches(1, 0))


def test_inference_batches_hold_every_row_once_cut_to_a_bucket_that_fits(processed):
    split = SetsSplit(processed / "train.h5", processed / "normalisation.json", use_context=False)
    rows = np.random.default_rng(0).choice(len(split), size=45, replace=False)
    seen, widths = [], []
    for positions, batch, n_used in batches_by_multiplicity(split, rows, batch_size=16):
        assert batch["x"].shape[:2] == (16, n_used) and n_used in bucket_sizes(30)
        real = rows[positions]
        assert split.multiplicity[real].max() <= n_used  # no real particle is cut off
        assert n_used == 30 or split.multiplicity[real].max() > n_used // 2  # the smallest bucket that fits
        np.testing.assert_array_equal(batch["mask"][: len(positions)], split.mask[real, :n_used])
        np.testing.assert_array_equal(batch["mask"][len(positions) :], split.mask[real[-1:].repeat(16 - len(positions)), :n_used])
        seen += list(real)
        widths.append(split.multiplicity[real].max())
    assert sorted(seen) == sorted(rows)  # each row once
    assert widths == sorted(widths)  # by multiplicity

def test_processes_read_disjoint_windows_that_cover_each_epoch_once_in_bounded_memory(tmp_path):
    """A split of 40 chunks read in windows of ~1/16 of it by 2 processes: each process holds only
    its rows of one window, from its own share of the window's chunks (the two share at most the
    one chunk where the window is cut in two), the two read disjoint rows that together are the
    whole epoch (less the incomplete last batch) and each global batch of one process with two
    devices and two input shares, every batch holds the file's values of its rows, and a reader
    started at any step gives the batch an uninterrupted one gave there."""
    n_jets, batch_size = 40_000, 64
    folder = synthetic_split(tmp_path, n_jets)
    whole = SetsSplit(folder / "train.h5", folder / "normalisation.json", use_context=False)

    def reader(process_index):
        return TrainBatches(folder / "train.h5", folder / "normalisation.json", False, False, batch_size, seed=3, n_local_devices=1,
                            process_index=process_index, process_count=2, window_jets=2_500)

    tracemalloc.start()
    readers = [reader(0), reader(1)]
    steps = readers[0].batches_per_epoch
    seen = [[], []]
    for step in range(steps):
        for process, batches in enumerate(readers):
            batch, rows = batches(step), batches.process_rows(step)
            np.testing.assert_array_equal(batch["x"][0], whole.x[rows, : batch["x"].shape[2]])
            seen[process].append(rows)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    alone = TrainBatches(folder / "train.h5", folder / "normalisation.json", False, False, batch_size, seed=3, n_local_devices=2,
                         window_jets=2_500, input_shares=2)  # one process, two devices, two shares: the same global batches
    for step in range(steps):
        np.testing.assert_array_equal(alone.process_rows(step), np.concatenate([seen[0][step], seen[1][step]]))
    for window in range(-(-steps // readers[0].batches_per_window)):
        steps_of_window = range(window * readers[0].batches_per_window, min((window + 1) * readers[0].batches_per_window, steps))
        chunks = [{int(row) // ROWS_PER_CHUNK for step in steps_of_window for row in seen[process][step]} for process in (0, 1)]
        assert len(chunks[0] & chunks[1]) <= 1, chunks
    seen = [np.concatenate(rows) for rows in seen]
    assert steps == n_jets // batch_size and not set(seen[0]) & set(seen[1])
    together = np.concatenate(seen)
    assert len(set(together)) == len(together) == steps * batch_size  # each row at most once, all but < one batch
    assert peak < whole.x.nbytes / 4, (peak, whole.x.nbytes)  # 14.4 MB of particles; a window is 1/16 of it
    resumed = reader(1)
    for step in (steps + 5, 2 * steps - 1, 7):  # next epoch, its last batch, back in the first: the same batches
        np.testing.assert_array_equal(resumed(step)["x"], readers[1](step)["x"])
    assert not np.array_equal(readers[0].window_batches(0, 0), readers[0].window_batches(1, 0))  # reshuffled each epoch


def test_input_shares_that_do_not_divide_the_batch_are_refused(tmp_path):
    folder = synthetic_split(tmp_path, 2_000)
    for shares in (3, -2):
        with pytest.raises(PipelineError, match=rf"train\.batch_size=64 does not divide into train\.input_shares={shares} shares"):
            TrainBatches(folder / "train.h5", folder / "normalisation.json", False, False, 64, 0, 1, input_shares=shares)


def test_a_training_run_holds_a_window_of_the_train_split_not_the_whole(tmp_path):
    """Peak resident memory of a short training run, measured as ``benchmarks/bench_input.py``
    measures it (``VmHWM`` of a fresh process), on a train split of 40k jets and on one of 1M jets
    (390 MB of float32 particles and masks), read in windows of 8 192 jets: the larger split adds
    less than a quarter of its size (one window of the whole 1M split adds 430 MB). The measured runs
    compile nothing: a first run fills a compilation cache of their own. Compiling raises the peak
    by ~0.35 GB, and by tens of MB more or less from run to run under load, as much as the bound.
    Five steps of 256 jets: the first window is read whole before the first step, so more steps
    (20 gave the same peak, 0.894 GB against 0.893 on 40k jets) only take longer."""
    spec = importlib.util.spec_from_file_location("bench_input", PROJECT_ROOT / "benchmarks" / "bench_input.py")
    bench_input = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench_input)
    environment = {**os.environ, "JAX_COMPILATION_CACHE_DIR": str(tmp_path / "jax-cache"), "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0"}

    def peak_gb(n_jets):
        result = subprocess.run(
            [sys.executable, spec.origin, "--measure", "training", str(tmp_path / str(n_jets)), "--batch-size", "256",
             "--train-steps", "5", "--window-jets", "8192"],
            cwd=PROJECT_ROOT, env=environment, capture_output=True, text=True, timeout=600,
        )
        assert result.returncode == 0, result.stderr
        return json.loads(result.stdout.strip().splitlines()[-1])["train_peak_rss_gb"]

    for n_jets in (40_000, 1_000_000):
        (tmp_path / str(n_jets)).mkdir()
        bench_input.write_dataset(tmp_path / str(n_jets), n_jets, n_max=30)
    peak_gb(40_000)  # compiles, filling the cache
    peaks = {n_jets: peak_gb(n_jets) for n_jets in (40_000, 1_000_000)}
    split_gb = 1_000_000 * 30 * (3 * 4 + 1) / 1e9
    assert peaks[1_000_000] - peaks[40_000] < split_gb / 4, peaks


def test_every_validation_batch_draws_its_own_noise_and_the_same_at_every_call(tmp_path):
    """Validation scores its sets with the same times and noise at every call, so that steps compare,
    and each batch with draws of its own: a batch holding the same jets as the first scores
    differently (one key for every batch would repeat the first batch's score)."""
    first_half = synthetic_split(tmp_path, 8)
    with h5py.File(first_half / "train.h5") as file:
        jets = {name: file[name][:] for name in ("particles", "mask", "jets", "labels")}
    with write_sets(tmp_path / "val.h5", n_max=30, feature_names=PARTICLE_FEATURES, jet_feature_names=["pt", "eta", "mass", "n_particles"],
                    class_names=["g", "t"], source="test", config="") as writer:
        for _ in range(2):  # the same 8 jets twice
            writer.append(jets["particles"], jets["mask"], jets["jets"], jets["labels"])
    split = SetsSplit(tmp_path / "val.h5", tmp_path / "normalisation.json", False, False)
    model = build_vdm(compose_config(*TRAIN).model, data_dim=3, n_classes=2)
    params = init_params(model, jax.random.key(0), split.rows(np.arange(8), 30))
    both_batches = train_stage.val_nelbo_scorer(model, split, n_sets=16, batch_size=8, n_samples=2, seed=0)
    first_batch = train_stage.val_nelbo_scorer(model, split, n_sets=8, batch_size=8, n_samples=2, seed=0)
    assert both_batches(params) == both_batches(params)
    assert both_batches(params) != pytest.approx(first_batch(params), rel=1e-3)


def test_a_damaged_train_split_is_refused_naming_it(tmp_path):
    folder = synthetic_split(tmp_path, 3_000)
    with h5py.File(folder / "train.h5", "r") as file:
        chunk = file["particles"].id.get_chunk_info(1)
    with (folder / "train.h5").open("r+b") as file:
        file.seek(chunk.byte_offset + chunk.size // 2)
        flipped = bytes(byte ^ 0xFF for byte in file.read(16))
        file.seek(chunk.byte_offset + chunk.size // 2)
        file.write(flipped)
    batches = TrainBatches(folder / "train.h5", folder / "normalisation.json", False, False, 64, 0, 1, window_jets=500)
    with pytest.raises(PipelineError, match=r"train\.h5 is damaged: a chunk of its 'particles' data fails its checksum"):
        for step in range(batches.batches_per_epoch):
            batches(step)


@pytest.mark.slow
def test_two_processes_train_together_like_one(tmp_path, processed, reference):
    port = free_port()
    processes = [
        train(tmp_path, processed, devices=2, wait=False,
              env={"JAX_COORDINATOR_ADDRESS": f"127.0.0.1:{port}", "JAX_NUM_PROCESSES": "2", "JAX_PROCESS_ID": str(rank)})
        for rank in (0, 1)
    ]
    outputs = [process.communicate(timeout=600) for process in processes]
    for process, (_, stderr) in zip(processes, outputs):
        assert process.returncode == 0, stderr
    alone = train(tmp_path / "alone", processed, "train.input_shares=2")  # one process reading the two processes' shares
    assert alone.returncode == 0, alone.stderr
    assert_same_params(final_params(tmp_path)[0], final_params(tmp_path / "alone")[0])


def test_bfloat16_compute_keeps_float32_weights_and_the_float32_loss(processed, reference):
    batch = {name: array[0] for name, array in train_batches(processed, 8)(0).items()}
    models = {dtype: build_vdm(compose_config(*TRAIN, f"model.bfloat16={dtype == 'bfloat16'}").model, 3, 3)
              for dtype in ("float32", "bfloat16")}
    params = final_params(reference)[0]  # trained: the zero-initialised output layer has moved
    assert all(leaf.dtype == np.float32 for leaf in jax.tree.leaves(init_params(models["bfloat16"], jax.random.PRNGKey(0), batch)))
    losses = {dtype: float(vdm_loss(model, params, jax.random.PRNGKey(1), batch["x"], batch["mask"], batch["labels"])[0])
              for dtype, model in models.items()}
    assert np.isfinite(losses["bfloat16"])
    assert losses["bfloat16"] != losses["float32"]  # the compute really ran in bfloat16 ...
    np.testing.assert_allclose(losses["bfloat16"], losses["float32"], rtol=1e-3)  # ... and agrees to bfloat16 precision


@pytest.mark.parametrize("log_pt_rel", [False, True])
def test_a_split_read_in_part_holds_exactly_those_rows_of_the_whole(processed, log_pt_rel):
    """What sampling reads of its template split: only the rows it copies, standardised as the whole."""
    whole = SetsSplit(processed / "train.h5", processed / "normalisation.json", use_context=True, log_pt_rel=log_pt_rel)
    rows = np.array([0, 1, 17, 40, len(whole) - 1])
    part = SetsSplit(processed / "train.h5", processed / "normalisation.json", use_context=True, log_pt_rel=log_pt_rel, rows=rows)
    for name in ("x", "mask", "labels", "multiplicity", "context"):
        np.testing.assert_array_equal(getattr(part, name), getattr(whole, name)[rows], err_msg=name)
    np.testing.assert_array_equal(part.log_jacobian(), whole.log_jacobian()[rows])


def test_log_pt_rel_reads_the_logarithm_standardised_and_maps_back_with_its_jacobian(processed):
    """model.log_pt_rel: the model's pt_rel coordinate is (log pt_rel - mean) / std with the train
    split's statistics of log pt_rel (written by preprocess); to_physical inverts it exactly, and
    log_jacobian is ln |d features / dx| of each jet, checked by finite differences."""
    from pipeline.sets import read_sets

    sets = read_sets(processed / "train.h5")
    split = SetsSplit(processed / "train.h5", processed / "normalisation.json", use_context=False, log_pt_rel=True)
    mask, pt_rel = sets["mask"], sets["particles"][..., 2]
    statistics = json.loads((processed / "normalisation.json").read_text())["log_particles"]["pt_rel"]
    assert statistics["mean"] == pytest.approx(np.log(pt_rel[mask]).mean(), rel=1e-6)
    assert statistics["std"] == pytest.approx(np.log(pt_rel[mask]).std(), rel=1e-5)
    assert np.abs(split.x[mask]).max() < 10 and np.abs(split.x[..., 2][mask].mean()) < 1e-4  # standardised
    np.testing.assert_allclose(split.to_physical(split.x, mask), sets["particles"], rtol=2e-5, atol=1e-6)
    step = 1e-3
    x = split.x[:5].astype(np.float64)
    derivative = (split.to_physical(x + step, mask[:5]) - split.to_physical(x - step, mask[:5])) / (2 * step)
    by_differences = np.sum(np.where(mask[:5, :, None], np.log(np.abs(np.where(mask[:5, :, None], derivative, 1.0))), 0.0), axis=(1, 2))
    np.testing.assert_allclose(split.log_jacobian()[:5], by_differences, rtol=1e-5)
    plain = SetsSplit(processed / "train.h5", processed / "normalisation.json", use_context=False)
    assert np.all(plain.log_jacobian() != split.log_jacobian())


def test_the_kept_momentum_sum_is_one_more_standardised_context_column(processed):
    """model.context_pt_rel_sum: each jet's sum of pt_rel over its kept particles, standardised with the
    train split's statistics (written by preprocess), follows the jet features in the context."""
    from pipeline.sets import read_sets

    sets = read_sets(processed / "train.h5")
    sums = np.where(sets["mask"], sets["particles"][..., PARTICLE_FEATURES.index("pt_rel")], 0.0).sum(axis=1, dtype=np.float64)
    statistics = json.loads((processed / "normalisation.json").read_text())["kept_particles"]["pt_rel_sum"]
    assert statistics["mean"] == pytest.approx(sums.mean(), rel=1e-9)
    assert statistics["std"] == pytest.approx(sums.std(), rel=1e-6) and statistics["std"] > 0
    plain = SetsSplit(processed / "train.h5", processed / "normalisation.json", use_context=True)
    with_sum = SetsSplit(processed / "train.h5", processed / "normalisation.json", use_context=True, context_pt_rel_sum=True)
    assert with_sum.jet_feature_names == [*plain.jet_feature_names, "pt_rel_sum"]
    np.testing.assert_array_equal(with_sum.context[:, :-1], plain.context)
    np.testing.assert_allclose(with_sum.context[:, -1], (sums - sums.mean()) / sums.std(), rtol=1e-5, atol=1e-5)
    rows = np.array([2, 9, len(plain) - 1])
    part = SetsSplit(processed / "train.h5", processed / "normalisation.json", use_context=True, rows=rows, context_pt_rel_sum=True)
    np.testing.assert_array_equal(part.context, with_sum.context[rows])


def test_the_kept_mass_replaces_the_jet_mass_in_the_context(tmp_path):
    """model.context_kept_mass: the mass column of the context is the kept particles' invariant mass
    (massless particles: m^2 = sum_{i<j} 2 pt_i pt_j (cosh d_eta - cos d_phi), in units of the jet's
    pT, times that pT), standardised as the jet mass is; the other columns stay as they were."""
    eta_phi_pt = np.zeros((2, 30, 3), np.float32)
    eta_phi_pt[0, :2] = [[-0.1, 0.0, 0.5], [0.1, 0.0, 0.5]]  # kept mass 0.1002 x pT, lighter than the jet's 80 GeV
    eta_phi_pt[1, :3] = [[0.0, 0.2, 0.6], [0.0, -0.2, 0.3], [0.3, 0.0, 0.1]]  # kept mass 0.2004 x pT, heavier than the file's 60 GeV
    mask = np.arange(30) < np.array([[2], [3]])
    jets = np.array([[500.0, 0.3, 80.0, 2], [400.0, -1.0, 60.0, 3]], np.float32)
    with write_sets(tmp_path / "train.h5", n_max=30, feature_names=PARTICLE_FEATURES, jet_feature_names=["pt", "eta", "mass", "n_particles"],
                    class_names=["g", "t"], source="test", config="") as writer:
        writer.append(eta_phi_pt, mask, jets, np.array([0, 1], np.int32))  # PARTICLE_FEATURES: eta_rel, phi_rel, pt_rel
    jet_statistics = {"pt": {"mean": 450.0, "std": 50.0}, "eta": {"mean": 0.0, "std": 1.0}, "mass": {"mean": 40.0, "std": 20.0},
                      "n_particles": {"mean": 2.5, "std": 0.5}}
    (tmp_path / "normalisation.json").write_text(json.dumps({
        "particles": {name: {"mean": 0.0, "std": 1.0} for name in PARTICLE_FEATURES}, "jets": jet_statistics}))

    def kept_mass(eta, phi, pt):
        pairs = [(i, j) for i in range(len(pt)) for j in range(i + 1, len(pt))]
        return np.sqrt(sum(2 * pt[i] * pt[j] * (np.cosh(eta[i] - eta[j]) - np.cos(phi[i] - phi[j])) for i, j in pairs))

    expected_mass = [jets[row, 0] * kept_mass(*eta_phi_pt[row, : mask[row].sum()].T.astype(np.float64)) for row in (0, 1)]
    assert expected_mass == pytest.approx([500 * 0.10017, 400 * 0.20042], rel=1e-4)
    plain = SetsSplit(tmp_path / "train.h5", tmp_path / "normalisation.json", use_context=True)
    kept = SetsSplit(tmp_path / "train.h5", tmp_path / "normalisation.json", use_context=True, context_kept_mass=True)
    assert plain.jet_feature_names == ["pt", "eta", "mass", "n_particles"]
    assert kept.jet_feature_names == ["pt", "eta", "kept_mass", "n_particles"]
    np.testing.assert_allclose(plain.context[:, 2], [(80 - 40) / 20, (60 - 40) / 20], rtol=1e-6)
    np.testing.assert_allclose(kept.context[:, 2], (np.array(expected_mass) - 40) / 20, rtol=1e-5)
    np.testing.assert_array_equal(kept.context[:, [0, 1, 3]], plain.context[:, [0, 1, 3]])
    np.testing.assert_array_equal(kept.x, plain.x)


@pytest.mark.parametrize("option, statistics, message", [
    ({"log_pt_rel": True}, "log_particles", r"no statistics of log\(pt_rel\)"),
    ({"context_pt_rel_sum": True}, "kept_particles", "no statistics of the jets' momentum-fraction sums"),
])
def test_an_option_refuses_statistics_that_predate_it(processed, tmp_path, option, statistics, message):
    normalisation = json.loads((processed / "normalisation.json").read_text())
    del normalisation[statistics]
    (tmp_path / "normalisation.json").write_text(json.dumps(normalisation))
    with pytest.raises(PipelineError, match=f"{message}.*preprocess the dataset again"):
        SetsSplit(processed / "train.h5", tmp_path / "normalisation.json", use_context=True, **option)
