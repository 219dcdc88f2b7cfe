"""Sampling and evaluation stages, run as a user runs them on a tiny trained model."""

import json
import tracemalloc

import h5py
import mlflow
import numpy as np
import pytest

from conftest import XLA_FLAGS, compose_config, run_stage
from jet_files import processed_dataset
from pipeline.evaluate import evaluate, input_paths, load as load_for_evaluation
from pipeline.input_pipeline import SetsSplit
from pipeline.config import PARTICLE_FEATURES
from pipeline.sample import SAMPLE_JET_FEATURES, generate
from pipeline.sets import read_sets, write_sets
from pipeline.checkpoints import load_checkpoint, trained_model
from pipeline.files import PipelineError

MODEL = ["model.d_model=16", "model.n_layers=1", "model.n_heads=2"]
TRAIN = ["train.steps=20", "train.batch_size=8", "train.warmup_steps=2", "train.val_every=10", "train.checkpoint_every=10",
         "train.val_jets=16"]
# Metric settings small enough for seconds, large enough that every estimator has data.
EVALUATE = ["evaluate.n_jets=300", "evaluate.w1_batches=3", "evaluate.fpd_min_jets=40", "evaluate.fpd_max_jets=80",
            "evaluate.fpd_points=3", "evaluate.fpd_batches=2", "evaluate.kpd_batches=3", "evaluate.kpd_jets=40",
            "evaluate.cov_mmd_jets=10", "evaluate.cov_mmd_batches=2", "evaluate.emd_jobs=1"]


def stage_args(results, processed, *extra):
    return [f"results_dir={results}", f"data.processed_dir={processed}", *MODEL, *TRAIN, *extra]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A processed g/q/t dataset and a model trained on it for a few steps."""
    folder = tmp_path_factory.mktemp("experiment")
    processed = processed_dataset(folder / "data")
    result = run_stage("train", *stage_args(folder / "results", processed))
    assert result.returncode == 0, result.stderr
    return folder / "results", processed


def test_sampling_writes_the_requested_jets_of_every_class_with_train_multiplicities(trained):
    results, processed = trained
    result = run_stage("sample", *stage_args(results, processed, "sample.n_jets=25", "sample.steps=3", "sample.batch_size=15"),
                       env={"XLA_FLAGS": f"{XLA_FLAGS} --xla_force_host_platform_device_count=2"})
    assert result.returncode == 0, result.stderr
    samples, train = read_sets(results / "sample" / "samples.h5"), read_sets(processed / "train.h5")
    assert samples["class_names"] == ["g", "q", "t"] and np.bincount(samples["labels"]).tolist() == [25, 25, 25]
    assert samples["particles"].shape == (75, 30, 3) and samples["feature_names"] == ["eta_rel", "phi_rel", "pt_rel"]
    mask, particles = samples["mask"], samples["particles"]
    assert (particles[~mask] == 0).all() and np.isfinite(particles).all()
    assert (mask == (np.arange(30) < mask.sum(1, keepdims=True))).all()  # real particles first
    pt_rel = np.where(mask, particles[..., 2], -1.0)
    assert (np.diff(pt_rel, axis=1)[mask[:, 1:]] <= 0).all() and (particles[..., 2][mask] >= 0).all()
    for label in range(3):  # every multiplicity is one the class has in the train split
        allowed = set(train["mask"][train["labels"] == label].sum(1))
        assert set(mask[samples["labels"] == label].sum(1)) <= allowed
    assert (samples["jets"][:, 3] == mask.sum(1)).all() and samples["jet_feature_names"][2] == "mass_rel"
    run = mlflow.search_runs(experiment_names=["demo"], filter_string="tags.`pipeline.stage` = 'sample'").iloc[0]
    assert run["metrics.n_jets"] == 75 and run["metrics.jets_per_s"] > 0


def test_test_masks_are_copied_one_for_one(trained, tmp_path):
    """The sampling stage's work, called in-process (the command line is the test above's)."""
    results, processed = trained
    settings = stage_args(results, processed, "sample.n_jets=1000", "sample.steps=2", "sample.masks=test", "sample.checkpoint=latest")
    generate(compose_config(*settings), tmp_path / "samples.h5", progress=False)
    samples, test = read_sets(tmp_path / "samples.h5"), read_sets(processed / "test.h5")
    for label in range(3):  # fewer test jets than asked for: each is used once
        assert sorted(samples["mask"][samples["labels"] == label].sum(1)) == sorted(test["mask"][test["labels"] == label].sum(1))
    # Jet j of the file was made on the template test jet j (classes in order): its momentum
    # fractions add up to that jet's (sample.rescale_pt_rel, the default), except where this barely
    # trained model put every pt_rel of a jet below zero (clipped to 0, nothing to scale).
    template = np.concatenate([np.flatnonzero(test["labels"] == label) for label in range(3)])
    assert (samples["mask"].sum(1) == test["mask"][template].sum(1)).all()
    template_sum = np.where(test["mask"], test["particles"][..., 2], 0).sum(1)[template]
    generated_sum = samples["particles"][..., 2].sum(1)
    scaled = generated_sum > 0
    assert scaled.mean() > 0.8
    np.testing.assert_allclose(generated_sum[scaled], template_sum[scaled], rtol=1e-5)
    with h5py.File(tmp_path / "samples.h5") as file:
        assert file.attrs["rescale_pt_rel"]
        recorded = dict(file.attrs)

    # The same draw without the scaling: the network's own particles, whose sums the file above
    # recorded; scaling changed each jet's pt_rel by one factor and nothing else.
    generate(compose_config(*settings, "sample.rescale_pt_rel=false"), tmp_path / "unscaled.h5", progress=False)
    unscaled = read_sets(tmp_path / "unscaled.h5")
    unscaled_sum = unscaled["particles"][..., 2].sum(1)
    assert recorded["unscaled_pt_rel_sum_over_fraction"] == pytest.approx(np.mean(unscaled_sum > 1.05))
    off = ~(np.abs(unscaled_sum / template_sum - 1) <= 0.05)
    assert recorded["pt_rel_sum_off_by_5pct_fraction"] == pytest.approx(np.mean(off)) and 0 < off.mean()
    assert recorded["negative_pt_rel_clipped"] == unscaled["negative_pt_rel_clipped"]
    assert recorded["negative_pt_rel_fraction"] == pytest.approx(recorded["negative_pt_rel_clipped"] / samples["mask"].sum())
    np.testing.assert_allclose(samples["particles"][..., 2][scaled],
                               unscaled["particles"][..., 2][scaled] * (template_sum[scaled] / unscaled_sum[scaled])[:, None], rtol=1e-5)
    np.testing.assert_array_equal(samples["particles"][..., :2], unscaled["particles"][..., :2])


@pytest.mark.parametrize("settings", [["sample.churn=0.3", "sample.sampler=ancestral"], ["sample.churn=-0.1"]])
def test_churn_outside_the_deterministic_samplers_is_refused_before_anything_is_written(tmp_path, trained, settings):
    results, processed = trained
    cfg = compose_config(*stage_args(results, processed, *settings))
    with pytest.raises(PipelineError, match=r"^sample\.churn=.* set sample\.churn=0 or sample\.sampler=heun\.$"):
        generate(cfg, tmp_path / "samples.h5", progress=False)
    assert not (tmp_path / "samples.h5").exists()


def test_sampling_without_a_trained_model_says_what_to_do(tmp_path, trained):
    _, processed = trained
    result = run_stage("sample", *stage_args(tmp_path, processed))
    assert result.returncode == 2
    assert "train the model first" in result.stderr and not (tmp_path / "sample" / "samples.h5").exists()


@pytest.mark.slow
def test_evaluation_scores_every_class_with_the_truth_floor_beside_it(trained):
    results, processed = trained
    sampled = run_stage("sample", *stage_args(results, processed, "sample.n_jets=60", "sample.steps=3"))
    assert sampled.returncode == 0, sampled.stderr
    result = run_stage("evaluate", *stage_args(results, processed, *EVALUATE))
    assert result.returncode == 0, result.stderr
    metrics = json.loads((results / "evaluate" / "metrics.json").read_text())
    names = ["w1m", "w1p", "w1p_eta_rel", "w1p_phi_rel", "w1p_pt_rel", "w1efp", "fpd", "fpd_err", "kpd", "kpd_err", "cov", "mmd"]
    for comparison in ("sample", "truth"):
        for group in ("all", "g", "q", "t"):
            for name in names:
                assert np.isfinite(metrics[f"{comparison}.{group}.{name}"]), (comparison, group, name)
    assert metrics["sample.all.n_other"] == 180 and metrics["sample.g.n_other"] == 60
    # A few training steps are far from the data: every W1 is well above the truth floor.
    for name in ("w1p", "w1m"):
        assert metrics[f"sample.all.{name}"] > metrics[f"truth.all.{name}"]
    # FPD batches are drawn without replacement: the configured 40 to 80 jets scale down to end at the smaller sample.
    for comparison in ("sample", "truth"):
        for group in ("all", "g", "q", "t"):
            row = f"{comparison}.{group}"
            smaller_sample = min(metrics[f"{row}.n_reference"], metrics[f"{row}.n_other"])
            assert metrics[f"{row}.fpd_max_jets"] == min(80, smaller_sample), row
            assert metrics[f"{row}.fpd_min_jets"] == round(40 * metrics[f"{row}.fpd_max_jets"] / 80), row
            assert metrics[f"{row}.fpd_capped"] == float(smaller_sample < 80), row
    assert metrics["sample.g.fpd_capped"] == 1.0  # 60 generated jets of a class: fewer than 80
    table = (results / "evaluate" / "metrics.md").read_text()
    assert "| model vs test | all |" in table and "| train vs test (truth) | t |" in table
    g_sizes = f"N from {metrics['sample.g.fpd_min_jets']:.0f} to {metrics['sample.g.fpd_max_jets']:.0f} (capped;"
    assert f"model vs test, g: {g_sizes}" in table and "drawn without replacement" in table
    # What sampling did after the network is stated beneath the metrics, with the sample file's figures.
    generated = read_sets(results / "sample" / "samples.h5", datasets=())
    assert (f"- pt_rel below 0 set to 0: {generated['negative_pt_rel_clipped']} particles, "
            f"{generated['negative_pt_rel_fraction']:.2%} of the generated particles.") in table
    assert (f"(sample.rescale_pt_rel=true); the network's own sums were more than 5% off for "
            f"{generated['pt_rel_sum_off_by_5pct_fraction']:.1%} of the jets and past 1.05 for "
            f"{generated['unscaled_pt_rel_sum_over_fraction']:.2%} of them.") in table
    assert (results / "evaluate" / "plots" / "jet_mass.png").stat().st_size > 0
    run = mlflow.search_runs(experiment_names=["demo"], filter_string="tags.`pipeline.stage` = 'evaluate'").iloc[0]
    assert run["metrics.sample.all.w1m"] == pytest.approx(metrics["sample.all.w1m"])
    artifacts = {item.path for item in mlflow.MlflowClient().list_artifacts(run.run_id, "plots")}
    assert "plots/jet_images.png" in artifacts


def test_any_two_sets_files_compare_and_a_file_with_itself_scores_near_zero(trained, tmp_path):
    """The evaluation stage's metrics, computed in-process (the test above runs the command line)."""
    _, processed = trained
    test = processed / "test.h5"
    args = [*EVALUATE, f"evaluate.samples={test}", f"evaluate.reference={test}", f"evaluate.truth={processed / 'val.h5'}",
            "evaluate.per_class=false"]
    cfg = compose_config(*stage_args(tmp_path, processed, *args))
    paths = input_paths(cfg)
    assert paths == {"samples": test, "reference": test, "truth": processed / "val.h5"}
    metrics = evaluate(cfg, paths)[0]
    assert "sample.g.w1m" not in metrics and "sample.all.w1m" in metrics
    # Identical files differ only by the bootstrap draws; the val split is a different sample.
    assert metrics["sample.all.w1p"] < metrics["truth.all.w1p"]


def test_evaluate_reads_its_subset_of_a_large_file_without_holding_the_file(tmp_path):
    """``evaluate.max_jets`` of a file's jets, drawn at random, are the rows of the whole file that the
    same draw picks, and reading them holds a few HDF5 chunks beyond them, not the file."""
    rng = np.random.default_rng(0)
    n_jets, n_max = 40_000, 30
    with write_sets(tmp_path / "large.h5", n_max=n_max, feature_names=PARTICLE_FEATURES, jet_feature_names=["pt"],
                    class_names=["g", "t"], source="test", config="") as writer:
        for _ in range(4):
            writer.append(rng.normal(size=(n_jets // 4, n_max, 3)).astype(np.float32), rng.random((n_jets // 4, n_max)) < 0.5,
                          rng.normal(size=(n_jets // 4, 1)).astype(np.float32), rng.integers(0, 2, n_jets // 4).astype(np.int32))
    tracemalloc.start()
    subset = load_for_evaluation(tmp_path / "large.h5", 1000, np.random.default_rng(7))
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    whole = read_sets(tmp_path / "large.h5")
    rows = np.sort(np.random.default_rng(7).choice(n_jets, size=1000, replace=False))
    for name in ("particles", "mask", "jets", "labels"):
        np.testing.assert_array_equal(subset[name], whole[name][rows], err_msg=name)
    assert peak < whole["particles"].nbytes / 10, (peak, whole["particles"].nbytes)  # 14.4 MB of particles
    assert len(load_for_evaluation(tmp_path / "large.h5", n_jets + 1, rng)["labels"]) == n_jets  # a cap above the file: all


def test_a_damaged_sets_file_is_refused_naming_it_and_nothing_is_written(trained, tmp_path):
    """Bytes flipped inside one compressed chunk of the particles (a bad disk, a broken copy): the
    chunk's checksum fails, and evaluate stops with one sentence naming the file, not with metrics
    computed from whatever the damaged bytes decode to."""
    _, processed = trained
    damaged = tmp_path / "samples.h5"
    damaged.write_bytes((processed / "test.h5").read_bytes())
    with h5py.File(damaged, "r") as file:
        assert all(file[name].fletcher32 for name in ("particles", "mask", "jets", "labels"))  # as written
        chunk = file["particles"].id.get_chunk_info(0)
    middle = chunk.byte_offset + chunk.size // 2
    with damaged.open("r+b") as file:
        file.seek(middle)
        flipped = bytes(byte ^ 0xFF for byte in file.read(16))
        file.seek(middle)
        file.write(flipped)
    output = tmp_path / "evaluated"
    args = [*EVALUATE, f"evaluate.samples={damaged}", "evaluate.per_class=false", f"hydra.run.dir={output}"]
    result = run_stage("evaluate", *stage_args(tmp_path, processed, *args))
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
    message = result.stderr.strip().splitlines()[-1]
    assert message.startswith(f"evaluate: error: {damaged} is damaged: a chunk of its 'particles' data fails its checksum"), message
    assert message.endswith("rerun the stage that makes it."), message
    assert not (output / "metrics.json").exists()


def test_a_generated_file_cannot_feed_a_context_conditioned_model(trained, tmp_path):
    """Generated files hold relative jet features; standardising them with the GeV statistics of the
    train split would silently give wrong context, so it is refused."""
    _, processed = trained
    test = read_sets(processed / "test.h5")
    with write_sets(tmp_path / "generated.h5", n_max=30, feature_names=test["feature_names"], jet_feature_names=SAMPLE_JET_FEATURES,
                    class_names=test["class_names"], source="test", config="") as writer:
        writer.append(test["particles"], test["mask"], test["jets"], test["labels"])
    assert len(SetsSplit(tmp_path / "generated.h5", processed / "normalisation.json", use_context=False)) == len(test["labels"])
    with pytest.raises(PipelineError, match="relative jet features"):
        SetsSplit(tmp_path / "generated.h5", processed / "normalisation.json", use_context=True)


@pytest.mark.parametrize("setting", ["model.context_pt_rel_sum=true", "model.context_kept_mass=true", "model.log_pt_rel=false"])
def test_a_model_is_not_loaded_with_other_settings_of_how_its_data_is_read(trained, setting):
    """What the network is given (its context's columns, its pt_rel coordinate) is decided before it
    is built: a run asking for other choices than the training's is refused, naming the right one."""
    results, processed = trained
    cfg = compose_config(*stage_args(results, processed, setting))
    key, value = setting.split("=")
    asked = value == "true"
    with pytest.raises(PipelineError, match=rf"trained with {key}={not asked}, not {asked}; run with {key}={not asked}"):
        trained_model(cfg, data_dim=3, n_classes=3)
    assert trained_model(compose_config(*stage_args(results, processed)), data_dim=3, n_classes=3)[1]


def test_a_model_conditioned_on_jet_features_samples_with_each_test_jets_context(tmp_path, trained):
    """``model.use_jet_context=true`` (the demo's choice), trained by the stage: the network has a
    context embedding, and sampling with ``sample.masks=test`` takes each test jet's multiplicity and
    context once."""
    results, processed = trained
    summary = json.loads((results / "train" / "checkpoint.json").read_text())
    assert "context_embedding" in load_checkpoint(summary["latest"])["params"]["params"]["score_net"]
    settings = stage_args(results, processed, "model.use_jet_context=true", "sample.n_jets=1000", "sample.steps=2", "sample.masks=test",
                          "sample.rescale_pt_rel=false")
    generate(compose_config(*settings), tmp_path / "samples.h5", progress=False)
    samples, test = read_sets(tmp_path / "samples.h5"), read_sets(processed / "test.h5")
    for label in range(3):
        assert sorted(samples["mask"][samples["labels"] == label].sum(1)) == sorted(test["mask"][test["labels"] == label].sum(1))
    assert np.isfinite(samples["particles"]).all()
    # Without the rescaling the model's own momentum sums are written, which a barely trained
    # model gets wrong, and the file says so.
    template = np.concatenate([np.flatnonzero(test["labels"] == label) for label in range(3)])
    template_sum = np.where(test["mask"], test["particles"][..., 2], 0).sum(1)[template]
    assert not np.allclose(samples["particles"][..., 2].sum(1), template_sum, rtol=1e-2)
    with h5py.File(tmp_path / "samples.h5") as file:
        assert not file.attrs["rescale_pt_rel"]
