"""Likelihood stage: the trained model as a density over jets, and as an anomaly detector.

``python -m pipeline.likelihood experiment=<name> [likelihood.sets=<path>]`` scores every jet of a
sets file (default: the dataset's test split) under the training run's EMA parameters.

**The likelihood of a jet.** A jet is a set of ``n`` particles with ``d`` features each. The sets
file stores it as the tuple ``s = (s_1, ..., s_n)`` sorted by decreasing ``pt_rel``, and the model
sees it standardised, ``z = (s - mu) / sigma`` per feature (``normalisation.json``, from the train
split). The VDM (Kingma et al. 2021, arXiv:2107.00630) is conditioned on the multiplicity (through
the mask) and on the class ``c``; its ELBO bounds the log density ``q`` of ``z`` in R^(n d) (VDM
eq. 11), estimated by ``setdiff.nelbo`` with ``likelihood.n_samples`` stratified times:

    -ln q(z | n, c) <= NELBO(z | n, c).

The score network (``setdiff.ScoreNet``: no positional encodings) is permutation-equivariant and
the diffusion noise is i.i.d. over particles, so ``q`` is exchangeable: ``q(z_pi | n, c) = q(z | n,
c)`` for every permutation ``pi`` of the particles. Sorting by ``pt_rel`` maps each of the ``n!``
regions of R^(n d) where the particles come in one given order onto the region of sorted tuples, by
a permutation of coordinates (Jacobian 1), so the sorted tuple has density ``sum_pi q(z_pi | n, c)
= n! q(z | n, c)`` there and 0 elsewhere (ties have probability zero). That is the density of the
jet as a set of ``n`` particles: with ``p(n | c)`` below, ``p(n | c) n! q`` is the Janossy density
``j_n`` of a finite point process (Daley & Vere-Jones 2003, *An Introduction to the Theory of Point
Processes* I, section 5.3); for i.i.d. elements, ``n! prod_i f(s_i)`` is the density of the order
statistics (David & Nagaraja 2003, *Order Statistics*, section 2.2). In the file's physical units (``z = (s - mu) / sigma`` has Jacobian
``prod_f sigma_f^(-n)``):

    p(s | n, c) = n! q(z | n, c) prod_f sigma_f^(-n)    for s_1 > ... > s_n in pt_rel.

The VDM does not model the multiplicity; ``p(n | c)`` is the train split's histogram of class
``c`` with add-one (Laplace) smoothing over ``n = 1 .. n_max``, ``p(n | c) = (N_c(n) + 1) / (N_c +
n_max)``, so a multiplicity never seen in training is unlikely but not impossible (``n_max``: the
train split's; empty jets have no density, and preprocessing drops them). The negative
log-likelihood of a jet with its multiplicity, in nats per jet, is then bounded by

    -ln p(s, n | c) = -ln q(z | n, c) - ln n! + n sum_f ln sigma_f - ln p(n | c)
                   <= NELBO_nats(z | n, c) - ln n! + n sum_f ln sigma_f - ln p(n | c).

With ``model.log_pt_rel`` the model's coordinate is ``(ln pt_rel - mu) / sigma`` instead, whose Jacobian
has a further factor ``prod_i 1 / pt_rel_i``: ``sum_i ln pt_rel_i`` joins ``n sum_f ln sigma_f`` (both are
``SetsSplit.log_jacobian``). The three terms after the NELBO depend on ``n`` only (and, with
``log_pt_rel``, on the jet's momentum fractions); a per-dimension NELBO leaves them out and so
does not compare jets of different multiplicities (nor, through ``sigma``, models trained with
different normalisations).

A model with ``model.use_jet_context`` is conditioned on the jet's features ``w`` (pt, eta, mass
and ``n``): it bounds ``-ln p(s | w, c)``, the same terms without ``-ln p(n | c)`` (``n`` is among
the given features, whose density nothing models). Its anomaly score is then conditional on the
jet's mass and pT: it ranks jets by how unusual their particles are for jets of that mass, and
does not see an unusual mass itself (``nelbo.h5``'s ``given`` attribute says which case it is).
With ``model.context_pt_rel_sum`` the jet's sum of pt_rel over its kept particles is given too.
With ``model.context_kept_mass`` the mass given is that of the kept particles, not the whole jet's.

Scores per jet, in ``nelbo.h5``:

* ``nll_nats``: the bound on ``-ln p(s, n | c)`` above, given the jet's own class, for the classes
  the model was trained on (NaN for others); ``nll_nats_per_class`` given each of the model's classes;
* ``anomaly_score``: ``-ln sum_c pi_c exp(-nll_nats(c))``, ``pi_c`` the train split's class
  fractions: a bound on the negative log-likelihood of the jet under the mixture of classes the
  model was trained on (each ``exp(-nll_nats(c))`` is a lower bound on ``p(s, n | c)``). It needs
  no label, so it applies to any jet; high is anomalous;
* ``nelbo_bpd``: ``NELBO(z | n, c)`` alone, in bits per dimension (the unit of the train stage's
  ``val_nelbo_bpd``), given the jet's own class; ``nelbo_bpd_per_class`` given each class.

When the file holds classes the model was not trained on (a model trained on QCD jets, g and q,
scoring a test split with top jets), those jets are the signal and the trained classes the
background: the ROC curve of ``anomaly_score`` and its AUC are computed (scikit-learn), plotted
and logged. Outputs in ``results/<experiment>/likelihood/``: ``nelbo.h5`` (the scores above,
``multiplicity``, ``labels``, class names), ``metrics.json`` (means per class, AUC) and ``roc.png``.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path
from typing import Iterator

import h5py
import hydra
import jax
import matplotlib
import mlflow
import numpy as np
from omegaconf import DictConfig
from scipy.special import gammaln, logsumexp
from sklearn.metrics import roc_auc_score, roc_curve
from tqdm import tqdm

from setdiff import nelbo

from .checkpoints import trained_model
from .config import Config
from .input_pipeline import SetsSplit, batches_by_multiplicity
from .sets import count_jets, open_sets, read_multiplicities, read_sets
from .files import PipelineError, atomic_output, atomic_path
from .stage import stage
from .tracking import READ, WRITTEN, FileDataset, log_files

SCORED_BLOCK_JETS = 262_144  # jets of the scored file read and scored at a time

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def multiplicity_log_probability(multiplicity: np.ndarray, labels: np.ndarray, n_classes: int, n_max: int) -> np.ndarray:
    """``[n_classes, n_max + 1]``: ``ln p(n | c)`` from the train split's jets (their ``multiplicity``
    and class ``labels``), each class's histogram with add-one smoothing over ``n = 1 .. n_max``
    (column ``n = 0`` counts empty jets, which preprocessed splits do not hold: ``-inf``)."""
    counts = np.zeros((n_classes, n_max + 1))
    np.add.at(counts, (labels, multiplicity), 1.0)
    counts[:, 1:] += 1.0
    with np.errstate(divide="ignore"):
        return np.log(counts / counts.sum(axis=1, keepdims=True))


def jet_nll_nats(nelbo_bpd: np.ndarray, multiplicity: np.ndarray, n_features: int, log_jacobian: np.ndarray,
                 log_p_multiplicity: np.ndarray) -> np.ndarray:
    """``[n_jets, n_classes]``: the bound on ``-ln p(s, n | c)`` in nats per jet (module docstring),
    from each jet's NELBO in bits per dimension given each class, ``nelbo_bpd[n_jets, n_classes]``,
    and ``log_jacobian[n_jets]`` = ``ln |ds/dz|`` of each jet (``SetsSplit.log_jacobian``)."""
    n = multiplicity[:, None].astype(np.float64)
    nelbo_nats = nelbo_bpd * n * n_features * math.log(2.0)
    return nelbo_nats - gammaln(n + 1.0) + log_jacobian[:, None] - log_p_multiplicity[:, multiplicity].T


def nelbo_per_class(cfg: DictConfig, path: Path, normalisation_path: Path, n_features: int, n_classes: int,
                    progress: bool) -> Iterator[tuple[SetsSplit, np.ndarray]]:
    """The jets of the sets file ``path``, ``SCORED_BLOCK_JETS`` at a time (a ``SetsSplit`` of each
    block), with every jet's NELBO (bits per dimension) given each of the model's classes,
    ``[jets, n_classes]``: memory holds one block, whatever the file's size.

    Within a block jets are taken in order of multiplicity, in batches cut to their largest
    multiplicity (rounded up to a bucket), with the same noise for every class so differences come
    from the label; each batch's noise is seeded by ``(seed, batch)``, counting batches from the
    file's start.
    """
    model, params, _ = trained_model(cfg, n_features, n_classes)
    score = jax.jit(lambda batch, labels, key: nelbo(model, params, key, batch["x"], batch["mask"], labels,
                                                     batch.get("context"), n_samples=cfg.likelihood.n_samples))
    batch_size, n_jets = cfg.likelihood.batch_size, count_jets(path)
    block_starts = range(0, n_jets, SCORED_BLOCK_JETS)
    n_batches = sum(-(-min(SCORED_BLOCK_JETS, n_jets - first) // batch_size) for first in block_starts)
    key = jax.random.PRNGKey(cfg.seed)
    batch_index = 0
    with tqdm(total=n_batches, desc="likelihood", unit="batch", disable=not (progress and sys.stderr.isatty())) as bar:
        for first in block_starts:
            rows = np.arange(first, min(first + SCORED_BLOCK_JETS, n_jets))
            split = SetsSplit(path, normalisation_path, cfg.model.use_jet_context, cfg.model.log_pt_rel, rows=rows,
                              context_pt_rel_sum=cfg.model.context_pt_rel_sum, context_kept_mass=cfg.model.context_kept_mass)
            scores = np.empty((len(split), n_classes))
            for positions, batch, _ in batches_by_multiplicity(split, np.arange(len(split)), batch_size):
                batch_key = jax.random.fold_in(key, batch_index)
                for label in range(n_classes):
                    labels = np.full(batch_size, label, np.int32)
                    scores[positions, label] = np.asarray(score(batch, labels, batch_key))[: len(positions)]
                batch_index += 1
                bar.update()
            yield split, scores


def plot_roc(false_positive_rate, true_positive_rate, auc: float, signal: list[str], background: list[str], path: Path) -> None:
    """Background rejection 1/FPR against signal efficiency, the way taggers are compared."""
    figure, axes = plt.subplots(figsize=(5, 4.5))
    keep = false_positive_rate > 0
    axes.plot(true_positive_rate[keep], 1.0 / false_positive_rate[keep], label=f"NLL per jet, AUC = {auc:.3f}")
    axes.plot(np.linspace(0.01, 1, 100), 1.0 / np.linspace(0.01, 1, 100), "k:", label="random")
    axes.set_yscale("log")
    axes.set_xlabel(f"signal efficiency ({', '.join(signal)} jets)")
    axes.set_ylabel(f"background rejection 1/ε ({', '.join(background)} jets)")
    axes.set_title("Anomaly detection with the model's likelihood")
    axes.legend(frameon=False)
    axes.tick_params(direction="in", which="both", top=True, right=True)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def scored_path(cfg: DictConfig) -> Path:
    """The sets file to score: ``likelihood.sets``, by default the test split."""
    return Path(cfg.likelihood.sets or Path(cfg.data.processed_dir) / "test.h5")


def score_file(cfg: DictConfig, output_dir: Path, progress: bool = True) -> dict[str, float]:
    """Score ``likelihood.sets`` (default: the test split); write ``nelbo.h5`` and the ROC plot.

    Returns the metrics: ``nll_nats`` and ``nelbo_bpd`` (means over the jets of the model's
    classes, given their class) and per class ``nll_nats.<class>`` and ``nelbo_bpd.<class>`` for
    the model's classes, ``anomaly_score.<class>`` for every class of the file; ``anomaly_auc`` when
    the file holds both classes the model was trained on and others.
    """
    processed, path = Path(cfg.data.processed_dir), scored_path(cfg)
    for needed in (path, processed / "train.h5", processed / "normalisation.json"):
        if not needed.is_file():
            raise PipelineError(f"{needed} does not exist; run `python -m pipeline.preprocess data={cfg.data.name}` first or set likelihood.sets.")
    # Labels and multiplicities only, never a whole file's particles.
    train = read_sets(processed / "train.h5", datasets=("labels",))
    model_classes = list(train["class_names"])
    with open_sets(processed / "train.h5") as file:
        n_max, train_multiplicity = file["mask"].shape[1], read_multiplicities(processed / "train.h5", file["mask"])
    scored = read_sets(path, datasets=())  # its attributes
    class_names, n_features = scored["class_names"], len(scored["feature_names"])
    with open_sets(path) as file:
        multiplicity = read_multiplicities(path, file["mask"])
    if not len(multiplicity):
        raise PipelineError(f"{path} holds no jets; score a sets file that has some.")
    if multiplicity.min() < 1 or multiplicity.max() > n_max:
        raise PipelineError(
            f"{path} holds jets of {multiplicity.min()} to {multiplicity.max()} particles; the model's multiplicities "
            f"are 1 to {n_max} (the train split's n_max): drop empty jets and keep at most {n_max} particles per jet "
            f"(`python -m pipeline.preprocess data.n_max={n_max}` does both)."
        )
    if cfg.model.use_jet_context:  # n is among the given jet features: no term for its probability
        log_p_multiplicity = np.zeros((len(model_classes), n_max + 1))
    else:
        log_p_multiplicity = multiplicity_log_probability(train_multiplicity, train["labels"], len(model_classes), n_max)
    nll_blocks, nelbo_blocks, labels = [], [], []
    for split, per_class in nelbo_per_class(cfg, path, processed / "normalisation.json", n_features, len(model_classes), progress):
        nelbo_blocks.append(per_class)
        nll_blocks.append(jet_nll_nats(per_class, split.multiplicity, n_features, split.log_jacobian(), log_p_multiplicity))
        labels.append(split.labels)
    per_class, nll_per_class, labels = (np.concatenate(blocks) for blocks in (nelbo_blocks, nll_blocks, labels))
    given = ["class", *split.jet_feature_names]  # the context's columns, as the model read them (the same in every block)
    with np.errstate(divide="ignore"):
        log_class_fraction = np.log(np.bincount(train["labels"], minlength=len(model_classes)) / len(train["labels"]))
    anomaly_score = -logsumexp(log_class_fraction - nll_per_class, axis=1)

    own_class = np.array([model_classes.index(name) if name in model_classes else -1 for name in class_names])[labels]
    known = own_class >= 0
    nelbo_bpd, nll_nats = np.full(len(labels), np.nan), np.full(len(labels), np.nan)
    nelbo_bpd[known] = per_class[known, own_class[known]]
    nll_nats[known] = nll_per_class[known, own_class[known]]
    with atomic_path(output_dir / "nelbo.h5") as temporary, h5py.File(temporary, "w") as file:
        file["nll_nats"], file["nll_nats_per_class"], file["anomaly_score"] = nll_nats, nll_per_class, anomaly_score
        file["nelbo_bpd"], file["nelbo_bpd_per_class"] = nelbo_bpd, per_class
        file["multiplicity"], file["labels"] = multiplicity, labels
        file.attrs.update(class_names=class_names, model_class_names=model_classes, source=str(path), given=given)

    metrics = {name: float(np.mean(values[known])) if known.any() else float("nan")
               for name, values in (("nll_nats", nll_nats), ("nelbo_bpd", nelbo_bpd))}
    for label, name in enumerate(class_names):
        of_class = labels == label
        if not of_class.any():
            continue
        if name in model_classes:
            metrics[f"nll_nats.{name}"] = float(np.mean(nll_nats[of_class]))
            metrics[f"nelbo_bpd.{name}"] = float(np.mean(nelbo_bpd[of_class]))
        metrics[f"anomaly_score.{name}"] = float(np.mean(anomaly_score[of_class]))
    signal_classes = [name for name in class_names if name not in model_classes]
    if signal_classes and known.any():
        is_signal = ~known
        metrics["anomaly_auc"] = float(roc_auc_score(is_signal, anomaly_score))
        false_positive_rate, true_positive_rate, _ = roc_curve(is_signal, anomaly_score)
        background = [name for name in class_names if name in model_classes]
        plot_roc(false_positive_rate, true_positive_rate, metrics["anomaly_auc"], signal_classes, background, output_dir / "roc.png")
    return metrics


@hydra.main(config_path="conf", config_name="config", version_base="1.3")
def main(cfg: Config) -> None:
    with stage("likelihood", cfg) as output_dir:
        metrics = score_file(cfg, output_dir)
        with atomic_output(output_dir / "metrics.json") as file:
            json.dump(metrics, file, indent=2)
        mlflow.log_metrics({name: value for name, value in metrics.items() if np.isfinite(value)})
        processed, scored = Path(cfg.data.processed_dir), scored_path(cfg)
        log_files(READ, [FileDataset(scored, count_jets(scored)), FileDataset(processed / "train.h5", count_jets(processed / "train.h5")),
                         FileDataset(processed / "normalisation.json"), FileDataset(Path(cfg.results_dir) / "train" / "checkpoint.json")])
        log_files(WRITTEN, [FileDataset(output_dir / "nelbo.h5", count_jets(output_dir / "nelbo.h5"))])
        for artifact in ("metrics.json", "roc.png"):
            if (output_dir / artifact).exists():
                mlflow.log_artifact(str(output_dir / artifact))
        print("likelihood: " + ", ".join(f"{name} {value:.4g}" for name, value in metrics.items()))


if __name__ == "__main__":
    main()
