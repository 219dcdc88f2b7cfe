"""Toy stage: learn class-conditional square rings, a known answer, with the configured model.

``python -m pipeline.toy [overrides]`` trains the experiment's model (``model``, ``train`` and
``sample`` settings; ``toy.steps`` steps, by default ``train.steps``) on sets of 2-D points where
class ``k`` of 3 fills the square ring ``k/3 <= max(|x|, |y|) < (k+1)/3`` (``setdiff.toy``),
samples from it and scores the samples:

* ``inside_square``: fraction of generated points inside ``[-1, 1]^2`` (1 is perfect);
* ``own_ring``: fraction in the ring of their own class (chance is about 1/3);
* ``nelbo_bpd_in`` / ``nelbo_bpd_shifted``: negative ELBO in bits per dimension of held-out sets and
  of the same sets shifted by 1.5 (the first should be lower).

It checks the whole stack (JAX, the model, Hydra, MLflow) in a few CPU minutes, before any jets are
involved. Outputs in ``results/<experiment>/toy/``: ``metrics.json`` and ``samples.png``.
"""

from __future__ import annotations

import json
import time

import hydra
import jax
import matplotlib
import mlflow
import numpy as np

from setdiff import fit, nelbo, sample
from setdiff.toy import ring_index, square_ring_sets

from .config import Config
from .model import build_vdm, sampler_settings
from .files import atomic_output
from .stage import stage

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

N_CLASSES = 3
N_TEST_SETS = 300


def score(model, params, rng, test: dict, settings: dict) -> tuple[dict, np.ndarray]:
    """Sample sets with the test sets' sizes and classes (``setdiff.sample`` with ``settings``); return
    the metrics and the samples."""
    sample_rng, nelbo_rng = jax.random.split(rng)
    points = np.asarray(sample(model, params, sample_rng, test["mask"], test["labels"], **settings))
    ring = ring_index(points)[test["mask"]]
    wanted = np.broadcast_to(test["labels"][:, None], test["mask"].shape)[test["mask"]]
    shifted = (test["x"] + 1.5) * test["mask"][..., None]
    bits_in = nelbo(model, params, nelbo_rng, test["x"], test["mask"], test["labels"])
    bits_shifted = nelbo(model, params, nelbo_rng, shifted, test["mask"], test["labels"])
    metrics = {
        "inside_square": float(np.mean(ring >= 0)),
        "own_ring": float(np.mean(ring == wanted)),
        "nelbo_bpd_in": float(np.mean(bits_in)),
        "nelbo_bpd_shifted": float(np.mean(bits_shifted)),
    }
    return metrics, points


def plot_samples(points: np.ndarray, test: dict, metrics: dict, path) -> None:
    """One panel per class: generated points over the ring they should fill."""
    fig, axes = plt.subplots(1, N_CLASSES, figsize=(4 * N_CLASSES, 4), sharex=True, sharey=True)
    for k, ax in enumerate(axes):
        chosen = test["mask"] & (test["labels"][:, None] == k)
        ax.scatter(*points[chosen].T, s=2, alpha=0.5, label="generated")
        for half_width in (k / N_CLASSES, (k + 1) / N_CLASSES):
            ax.add_patch(plt.Rectangle((-half_width, -half_width), 2 * half_width, 2 * half_width, fill=False, color="k"))
        ax.set(title=f"class {k}", xlabel="x", xlim=(-1.3, 1.3), ylim=(-1.3, 1.3), aspect="equal")
    axes[0].set_ylabel("y")
    axes[0].legend(loc="upper right")
    fig.suptitle(f"inside square {metrics['inside_square']:.1%}, in own ring {metrics['own_ring']:.1%}")
    fig.tight_layout()
    with atomic_output(path, "wb") as file:
        fig.savefig(file, format="png", dpi=100)
    plt.close(fig)


@hydra.main(config_path="conf", config_name="config", version_base="1.3")
def main(cfg: Config) -> None:
    with stage("toy", cfg) as output_dir:
        model = build_vdm(cfg.model, data_dim=2, n_classes=N_CLASSES)
        settings = sampler_settings(cfg.sample)
        data_rng = np.random.default_rng(cfg.seed)
        rng = jax.random.key(cfg.seed)

        def log(step, metrics):
            if step % cfg.train.log_every == 0 or step == cfg.toy.steps - 1:
                mlflow.log_metrics({name: float(value) for name, value in metrics.items()}, step=step)

        start = time.perf_counter()
        state = fit(
            model,
            lambda step: square_ring_sets(data_rng, cfg.train.batch_size, n_classes=N_CLASSES),
            cfg.toy.steps,
            rng,
            learning_rate=cfg.train.learning_rate,
            warmup_steps=cfg.train.warmup_steps,
            ema_decay=cfg.train.ema_decay,
            on_metrics=log,
        )
        train_seconds = time.perf_counter() - start
        test = square_ring_sets(np.random.default_rng(cfg.seed + 1), N_TEST_SETS, n_classes=N_CLASSES)
        metrics, points = score(model, state.ema_params, jax.random.fold_in(rng, 1), test, settings)
        metrics["train_sets_per_second"] = cfg.toy.steps * cfg.train.batch_size / train_seconds
        mlflow.log_metrics(metrics)
        with atomic_output(output_dir / "metrics.json") as file:
            json.dump(metrics, file, indent=2)
        plot_samples(points, test, metrics, output_dir / "samples.png")
        mlflow.log_artifact(str(output_dir / "metrics.json"))
        mlflow.log_artifact(str(output_dir / "samples.png"))
        print(json.dumps(metrics, indent=2))


if __name__ == "__main__":
    main()
