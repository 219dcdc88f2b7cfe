"""Likelihood stage: the trained model as a density, per jet, and as an anomaly detector.

``python -m pipeline.likelihood experiment=<name> [likelihood.sets=<path>]`` scores every jet of a
sets file (default: the dataset's test split) with the negative ELBO of the training run's EMA
parameters, in bits per dimension (``setdiff.nelbo``: VDM's bound, Kingma et al. 2021,
arXiv:2107.00630 eq. 11, averaged over ``likelihood.n_samples`` stratified times). The ELBO bounds
log p(x | class), so a jet's NELBO is an upper bound on its negative log-likelihood per dimension.

Two scores per jet:

* ``nelbo_bpd``: given the jet's own class, for the classes the model was trained on (NaN for others);
* ``anomaly_score``: the smallest NELBO over the model's classes, min_c NELBO(x | c), which needs no
  label and so applies to any jet.

When the file holds classes the model was not trained on (a model trained on QCD jets, g and q,
scoring a test split with top jets), those jets are the signal and the trained classes the
background: the ROC curve of ``anomaly_score`` (high = anomalous) and its AUC are computed
(scikit-learn), plotted and logged. Outputs in ``results/<experiment>/likelihood/``:
``nelbo.h5`` (per-jet scores, labels, class names), ``metrics.json`` (mean NELBO per class, AUC)
and ``roc.png``.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import h5py
import hydra
import jax
import matplotlib
import mlflow
import numpy as np
from omegaconf import DictConfig
from sklearn.metrics import roc_auc_score, roc_curve
from tqdm import tqdm

from setdiff import nelbo

from .config import Config
from .input_pipeline import SetsSplit, bucket_sizes
from .sample import trained_model
from .sets import read_sets
from .stage import PipelineError, atomic_output, atomic_path, stage

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def nelbo_per_class(cfg: DictConfig, split: SetsSplit, n_classes: int, progress: bool) -> np.ndarray:
    """``[n_jets, n_classes]``: every jet's NELBO (bits per dimension) given each of the model's classes.

    Jets are taken in order of multiplicity, in batches cut to their largest multiplicity (rounded
    up to a bucket), with the same noise for every class so differences come from the label.
    """
    model, params, _ = trained_model(cfg, split.x.shape[-1], n_classes)
    score = jax.jit(lambda batch, labels, key: nelbo(model, params, key, batch["x"], batch["mask"], labels,
                                                     batch.get("context"), n_samples=cfg.likelihood.n_samples))
    batch_size = cfg.likelihood.batch_size
    by_size = np.argsort(split.multiplicity, kind="stable")
    buckets = np.array(bucket_sizes(split.mask.shape[1]))
    scores = np.empty((len(split), n_classes))
    key = jax.random.PRNGKey(cfg.seed)
    for first in tqdm(range(0, len(split), batch_size), desc="likelihood", unit="batch", disable=not (progress and sys.stderr.isatty())):
        positions = by_size[first : first + batch_size]
        filled = np.concatenate([positions, np.full(batch_size - len(positions), positions[-1])])  # one shape per bucket
        n_used = int(buckets[np.searchsorted(buckets, split.multiplicity[positions].max())])
        batch = split.rows(filled, n_used)
        batch_key = jax.random.fold_in(key, first)
        for label in range(n_classes):
            labels = np.full(batch_size, label, np.int32)
            scores[positions, label] = np.asarray(score(batch, labels, batch_key))[: len(positions)]
    return scores


def plot_roc(false_positive_rate, true_positive_rate, auc: float, signal: list[str], background: list[str], path: Path) -> None:
    """Background rejection 1/FPR against signal efficiency, the way taggers are compared."""
    figure, axes = plt.subplots(figsize=(5, 4.5))
    keep = false_positive_rate > 0
    axes.plot(true_positive_rate[keep], 1.0 / false_positive_rate[keep], label=f"NELBO, AUC = {auc:.3f}")
    axes.plot(np.linspace(0.01, 1, 100), 1.0 / np.linspace(0.01, 1, 100), "k:", label="random")
    axes.set_yscale("log")
    axes.set_xlabel(f"signal efficiency ({', '.join(signal)} jets)")
    axes.set_ylabel(f"background rejection 1/ε ({', '.join(background)} jets)")
    axes.set_title("Anomaly detection with the model's NELBO")
    axes.legend(frameon=False)
    axes.tick_params(direction="in", which="both", top=True, right=True)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def score_file(cfg: DictConfig, output_dir: Path, progress: bool = True) -> dict[str, float]:
    """Score ``likelihood.sets`` (default: the test split); write ``nelbo.h5`` and the ROC plot."""
    processed = Path(cfg.data.processed_dir)
    path = Path(cfg.likelihood.sets or processed / "test.h5")
    for needed in (path, processed / "train.h5", processed / "normalisation.json"):
        if not needed.is_file():
            raise PipelineError(f"{needed} does not exist; run `python -m pipeline.preprocess data={cfg.data.name}` first or set likelihood.sets.")
    model_classes = list(read_sets(processed / "train.h5")["class_names"])
    split = SetsSplit(path, processed / "normalisation.json", cfg.model.use_jet_context)
    per_class = nelbo_per_class(cfg, split, len(model_classes), progress)

    own_class = np.array([model_classes.index(name) if name in model_classes else -1 for name in split.class_names])[split.labels]
    known = own_class >= 0
    nelbo_bpd = np.full(len(split), np.nan)
    nelbo_bpd[known] = per_class[known, own_class[known]]
    anomaly_score = per_class.min(axis=1)
    with atomic_path(output_dir / "nelbo.h5") as temporary, h5py.File(temporary, "w") as file:
        file["nelbo_bpd"], file["anomaly_score"], file["labels"] = nelbo_bpd, anomaly_score, split.labels
        file["nelbo_bpd_per_class"] = per_class
        file.attrs.update(class_names=split.class_names, model_class_names=model_classes, source=str(path))

    metrics = {"nelbo_bpd": float(np.mean(nelbo_bpd[known])) if known.any() else float("nan")}
    for label, name in enumerate(split.class_names):
        of_class = split.labels == label
        if of_class.any():
            metrics[f"nelbo_bpd.{name}"] = float(np.mean(nelbo_bpd[of_class] if name in model_classes else anomaly_score[of_class]))
    signal_classes = [name for name in split.class_names if name not in model_classes]
    if signal_classes and known.any():
        is_signal = ~known
        metrics["anomaly_auc"] = float(roc_auc_score(is_signal, anomaly_score))
        false_positive_rate, true_positive_rate, _ = roc_curve(is_signal, anomaly_score)
        background = [name for name in split.class_names if name in model_classes]
        plot_roc(false_positive_rate, true_positive_rate, metrics["anomaly_auc"], signal_classes, background, output_dir / "roc.png")
    return metrics


@hydra.main(config_path="conf", config_name="config", version_base="1.3")
def main(cfg: Config) -> None:
    with stage("likelihood", cfg) as output_dir:
        metrics = score_file(cfg, output_dir)
        with atomic_output(output_dir / "metrics.json") as file:
            json.dump(metrics, file, indent=2)
        mlflow.log_metrics({name: value for name, value in metrics.items() if np.isfinite(value)})
        for artifact in ("metrics.json", "roc.png"):
            if (output_dir / artifact).exists():
                mlflow.log_artifact(str(output_dir / artifact))
        print("likelihood: " + ", ".join(f"{name} {value:.4g}" for name, value in metrics.items()))


if __name__ == "__main__":
    main()
