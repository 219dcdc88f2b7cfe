"""The likelihood stage: a per-jet likelihood that scores jets of a class the model never saw as unlikely.

One tiny model, trained in-process on synthetic jets of one class ("narrow":
particles within ~0.05 of the jet axis), scores a file holding those jets and jets of a class it
never saw ("wide": the same multiplicities and pt_rel spectrum, particles eight times farther
out). Every sets file is written with ``pipeline.sets``.
"""

import json
import math
from collections import Counter
from pathlib import Path

import h5py
import numpy as np
import pytest

from conftest import compose_config
from pipeline.config import JET_FEATURES, PARTICLE_FEATURES
from pipeline import likelihood
from pipeline.likelihood import score_file
from pipeline.sets import read_sets, write_sets
from pipeline.files import PipelineError, write_config
from pipeline.train import train

N_MAX = 8
# The train split's multiplicities, by hand: 20 jets of 3 particles, 12 of 4, 8 of 6.
TRAIN_MULTIPLICITIES = [3] * 20 + [4] * 12 + [6] * 8
# Scored jets: seen multiplicities, an unseen one (5) and the largest allowed (N_MAX).
SCORED_MULTIPLICITIES = [3, 4, 6, 5, N_MAX] * 8
NARROW_SPREAD, WIDE_SPREAD = 0.05, 0.4  # standard deviation of eta_rel and phi_rel
# The hand-written likelihoods below are those of pt_rel itself (with log_pt_rel the Jacobian adds
# sum ln pt_rel, tested in test_train.py).
MODEL = ["model.d_model=16", "model.n_layers=1", "model.n_heads=2", "model.use_jet_context=false", "model.log_pt_rel=false"]
# Steps are cheap (compiling dominates the fixture's ~30 s of CPU); 300 at a high learning rate
# separate the classes with a wide margin (AUC ~0.99).
TRAIN = ["train.steps=300", "train.batch_size=8", "train.warmup_steps=5", "train.learning_rate=1e-2", "train.val_every=300",
         "train.checkpoint_every=300", "train.val_jets=8", "train.ema_decay=0.9"]
SCORE = ["likelihood.n_samples=8", "likelihood.batch_size=40"]


def synthetic_particles(rng: np.random.Generator, multiplicities: list[int], spread: float) -> tuple[np.ndarray, np.ndarray]:
    """``particles[n_jets, N_MAX, 3]`` (eta_rel, phi_rel, pt_rel), hardest first and zero-padded, and the mask."""
    particles = np.zeros((len(multiplicities), N_MAX, len(PARTICLE_FEATURES)), np.float32)
    for row, n in enumerate(multiplicities):
        pt_rel = np.sort(rng.dirichlet(np.ones(n)))[::-1]
        particles[row, :n] = np.column_stack([rng.normal(0.0, spread, (n, 2)), pt_rel])
    return particles, np.arange(N_MAX) < np.array(multiplicities)[:, None]


def write_split(path, particles, mask, labels, class_names) -> None:
    with write_sets(path, n_max=particles.shape[1], feature_names=PARTICLE_FEATURES, jet_feature_names=JET_FEATURES,
                    class_names=class_names, source="synthetic", config="") as writer:
        jets = np.column_stack([np.full(len(labels), 1000.0), np.zeros(len(labels)), np.full(len(labels), 100.0), mask.sum(axis=1)])
        writer.append(particles, mask, jets.astype(np.float32), np.asarray(labels, np.int32))


@pytest.fixture(scope="module")
def narrow_model(tmp_path_factory):
    """A processed dataset of narrow jets (train, val, normalisation.json), a model trained on it,
    and ``scored.h5`` holding narrow (label 0) and wide (label 1) jets; returns the config."""
    folder = tmp_path_factory.mktemp("likelihood")
    processed, train_dir = folder / "processed", folder / "results" / "train"
    processed.mkdir()
    rng = np.random.default_rng(0)
    train_particles, train_mask = synthetic_particles(rng, TRAIN_MULTIPLICITIES, NARROW_SPREAD)
    write_split(processed / "train.h5", train_particles, train_mask, [0] * len(TRAIN_MULTIPLICITIES), ["narrow"])
    write_split(processed / "val.h5", *synthetic_particles(rng, [6] * 8, NARROW_SPREAD), [0] * 8, ["narrow"])
    real = train_particles[train_mask]
    normalisation = {"particles": {name: {"mean": float(real[:, i].mean()), "std": float(real[:, i].std())}
                                   for i, name in enumerate(PARTICLE_FEATURES)},
                     "jets": {}, "n_train_particles": len(real), "n_train_jets": len(TRAIN_MULTIPLICITIES)}  # as preprocess writes it
    normalisation["jets"] = {name: {"mean": 0.0, "std": 1.0} for name in JET_FEATURES}  # only the context model reads them
    (processed / "normalisation.json").write_text(json.dumps(normalisation))
    narrow, narrow_mask = synthetic_particles(rng, SCORED_MULTIPLICITIES, NARROW_SPREAD)
    wide, wide_mask = synthetic_particles(rng, SCORED_MULTIPLICITIES, WIDE_SPREAD)
    labels = [0] * len(SCORED_MULTIPLICITIES) + [1] * len(SCORED_MULTIPLICITIES)
    write_split(folder / "scored.h5", np.concatenate([narrow, wide]), np.concatenate([narrow_mask, wide_mask]), labels, ["narrow", "wide"])

    cfg = compose_config(f"results_dir={folder / 'results'}", f"data.processed_dir={processed}", "data.class_names=[narrow]",
                         f"likelihood.sets={folder / 'scored.h5'}", *MODEL, *TRAIN, *SCORE)
    summary = train(cfg, train_dir, primary=False, progress=False)  # what `python -m pipeline.train` leaves behind:
    write_config(cfg, train_dir / "config.yaml")
    (train_dir / "checkpoint.json").write_text(json.dumps(summary))
    return cfg


@pytest.fixture(scope="module")
def scored(narrow_model, tmp_path_factory):
    """The stage's metrics and ``nelbo.h5`` contents for ``scored.h5`` under the narrow model."""
    output_dir = tmp_path_factory.mktemp("scores")
    metrics = score_file(narrow_model, output_dir, progress=False)
    with h5py.File(output_dir / "nelbo.h5") as file:
        scores = {name: file[name][...] for name in file}
    return metrics, scores, output_dir


def test_jets_of_a_class_the_model_never_saw_are_less_likely(scored):
    metrics, scores, output_dir = scored
    labels = scores["labels"]
    assert metrics["anomaly_auc"] > 0.9 and (output_dir / "roc.png").stat().st_size > 0
    # Wide jets are less likely than narrow ones of the same multiplicity, for every multiplicity.
    for n in set(SCORED_MULTIPLICITIES):
        of_size = scores["multiplicity"] == n
        assert np.median(scores["anomaly_score"][of_size & (labels == 1)]) > np.median(scores["anomaly_score"][of_size & (labels == 0)])
    assert metrics["anomaly_score.wide"] > metrics["anomaly_score.narrow"]
    # Only the trained class has a likelihood given its own class.
    assert np.isnan(scores["nll_nats"][labels == 1]).all() and np.isfinite(scores["nll_nats"][labels == 0]).all()


def test_a_file_scored_block_by_block_gives_each_jet_its_own_scores(scored, narrow_model, tmp_path, monkeypatch):
    """Scoring reads the file a block at a time (bounded memory): in blocks of 7 jets every jet still
    gets its own scores, row for row with the file (each batch draws other noise than in one block,
    so single scores differ by the estimator's noise)."""
    _, whole, _ = scored
    monkeypatch.setattr(likelihood, "SCORED_BLOCK_JETS", 7)
    metrics = score_file(narrow_model, tmp_path, progress=False)
    with h5py.File(tmp_path / "nelbo.h5") as file:
        blocks = {name: file[name][...] for name in file}
    file = read_sets(narrow_model.likelihood.sets, datasets=("mask", "labels"))
    np.testing.assert_array_equal(blocks["multiplicity"], file["mask"].sum(axis=1))
    np.testing.assert_array_equal(blocks["labels"], file["labels"])
    # Scores still belong to their jets: wide and narrow jets are told apart as well as before, and
    # each class's mean moves by far less than what separates the classes.
    assert metrics["anomaly_auc"] > 0.9
    means = {name: [np.mean(scores["anomaly_score"][file["labels"] == label]) for label in (0, 1)]
             for name, scores in (("blocks", blocks), ("whole", whole))}
    separation = means["whole"][1] - means["whole"][0]
    assert separation > 0 and np.all(np.abs(np.subtract(means["blocks"], means["whole"])) < 0.1 * separation), (means, separation)


def test_the_likelihood_of_a_jet_adds_its_ordering_multiplicity_and_units_to_the_nelbo(scored, narrow_model):
    """-ln p(jet) = NELBO_nats - ln n! - ln p(n) + n sum_f ln std_f, with p(n) the train split's
    multiplicity histogram with add-one smoothing over 1..N_MAX, computed here by hand."""
    _, scores, _ = scored
    normalisation = json.loads((Path(narrow_model.data.processed_dir) / "normalisation.json").read_text())
    log_std_sum = sum(math.log(normalisation["particles"][name]["std"]) for name in PARTICLE_FEATURES)
    train_counts = Counter(TRAIN_MULTIPLICITIES)
    for row, n in enumerate(scores["multiplicity"]):
        p_multiplicity = (train_counts[n] + 1) / (len(TRAIN_MULTIPLICITIES) + N_MAX)
        nelbo_nats = scores["nelbo_bpd_per_class"][row, 0] * n * len(PARTICLE_FEATURES) * math.log(2)
        expected = nelbo_nats - math.lgamma(n + 1) - math.log(p_multiplicity) + n * log_std_sum
        assert scores["nll_nats_per_class"][row, 0] == pytest.approx(expected, rel=1e-6)  # the model reads std as float32
    # With one class, the label-free score is that class's likelihood.
    np.testing.assert_allclose(scores["anomaly_score"], scores["nll_nats_per_class"][:, 0], rtol=1e-12)


def test_a_model_given_the_jet_features_scores_particles_given_them(narrow_model, tmp_path):
    """With ``model.use_jet_context`` the multiplicity is among the given jet features: the bound
    is NELBO_nats - ln n! + n sum_f ln std_f, without the -ln p(n) of the density over jets, and
    the file says what the likelihood is conditioned on."""
    cfg = compose_config(*(f"{key}={value}" for key, value in (
        ("results_dir", tmp_path / "results"), ("data.processed_dir", narrow_model.data.processed_dir),
        ("data.class_names", "[narrow]"), ("likelihood.sets", narrow_model.likelihood.sets))),
        *MODEL, "model.use_jet_context=true", *TRAIN, "train.steps=20", *SCORE)
    train_dir = tmp_path / "results" / "train"
    summary = train(cfg, train_dir, primary=False, progress=False)
    write_config(cfg, train_dir / "config.yaml")
    (train_dir / "checkpoint.json").write_text(json.dumps(summary))
    score_file(cfg, tmp_path, progress=False)
    with h5py.File(tmp_path / "nelbo.h5") as file:
        scores = {name: file[name][...] for name in file} | {"given": list(file.attrs["given"])}
    assert scores["given"] == ["class", *JET_FEATURES]
    normalisation = json.loads((Path(cfg.data.processed_dir) / "normalisation.json").read_text())
    log_std_sum = sum(math.log(normalisation["particles"][name]["std"]) for name in PARTICLE_FEATURES)
    n = scores["multiplicity"]
    nelbo_nats = scores["nelbo_bpd_per_class"][:, 0] * n * len(PARTICLE_FEATURES) * math.log(2)
    expected = nelbo_nats - np.array([math.lgamma(k + 1) for k in n]) + n * log_std_sum
    np.testing.assert_allclose(scores["nll_nats_per_class"][:, 0], expected, rtol=1e-6)


def test_jets_larger_than_the_model_knows_are_refused(narrow_model, tmp_path):
    particles, _ = synthetic_particles(np.random.default_rng(1), [N_MAX] * 2, NARROW_SPREAD)
    wider = np.zeros((2, N_MAX + 4, 3), np.float32)
    wider[:, :N_MAX] = particles
    wider[:, N_MAX:] = [0.0, 0.0, 1e-4]
    cfg = compose_config(f"data.processed_dir={narrow_model.data.processed_dir}", f"likelihood.sets={tmp_path / 'wider.h5'}")
    write_split(tmp_path / "wider.h5", wider, np.ones((2, N_MAX + 4), bool), [0, 0], ["narrow"])
    with pytest.raises(PipelineError, match=f"1 to {N_MAX}.*data.n_max={N_MAX}"):
        score_file(cfg, tmp_path, progress=False)
