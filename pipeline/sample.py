"""Sampling stage: jets from the trained model, written as a sets file in physical units.

``python -m pipeline.sample experiment=<name> [overrides]`` loads the EMA parameters of the training
run in ``results/<experiment>/train/`` (the best checkpoint by val NELBO, or the latest with
``sample.checkpoint=latest``), with the model settings that run was trained with, and generates
``sample.n_jets`` jets of every class with ``setdiff.sample`` (sampler, steps, spacing of the noise
levels, churn and guidance scale from ``sample``). Each generated jet copies the multiplicity (its mask) and, for a model conditioned
on jet features, the context of a template jet: drawn at random from the train split's jets of the
class (``sample.masks=train``: the class's multiplicity distribution), or the test split's jets of
the class one for one (``sample.masks=test``, as several papers do).

Jets are sorted by multiplicity and sampled in batches cut to their largest multiplicity (rounded up
to a bucket of ``pipeline.input_pipeline.bucket_sizes``), with ``jax.pmap`` over every local device.
The model's output is un-normalised with the train split's statistics (``SetsSplit.to_physical``,
which also undoes ``model.log_pt_rel``); a negative ``pt_rel`` (the model's tails cross zero, which
cannot happen with ``log_pt_rel``) is set to 0 and counted (``negative_pt_rel_fraction`` in MLflow and
the file's attributes), since every jet observable assumes non-negative momenta. Particles are sorted by
decreasing ``pt_rel``, padded rows are zero.

Momentum sums: a jet's ``pt_rel`` add up to 1, or to a little less where the jet has more particles
than the dataset keeps. The model's particles add up to that only approximately (on the demo, 12%
of quark jets pass 1.05 without this step). With ``sample.rescale_pt_rel`` (the default) each
generated jet's ``pt_rel`` are scaled to add up to its template jet's sum, a jet-level quantity
taken from the data like the multiplicity; the model still decides how the momentum is shared and
where the particles go. How far the model's own sums were from the template's goes to MLflow
(``pt_rel_sum_ratio_sd``, ``pt_rel_sum_off_by_5pct_fraction``, and
``unscaled_pt_rel_sum_over_fraction``: the jets whose own sums passed 1.05) and to the file's
attributes, and ``pipeline.evaluate`` states it beneath the metrics; ``sample.rescale_pt_rel=false``
writes the model's particles as they are.

Output: ``results/<experiment>/sample/samples.h5``, a sets file whose ``jets`` hold the generated
jets' own kinematics from their particles (``pt_rel, eta_rel, mass_rel, n_particles``: relative to
the original jet, see ``pipeline.jets.jet_from_relative_particles``).
"""

from __future__ import annotations

import sys
import time
from functools import lru_cache, partial
from pathlib import Path

import hydra
import jax
import mlflow
import numpy as np
from omegaconf import DictConfig, OmegaConf
from tqdm import tqdm

from setdiff import sample

from .checkpoints import trained_model
from .config import PARTICLE_FEATURES, Config, MaskSource
from .input_pipeline import SetsSplit, batches_by_multiplicity
from .jets import PT_REL_SUM_LIMIT, jet_from_relative_particles
from .model import sampler_settings
from .sets import count_jets, read_sets, write_sets
from .files import PipelineError
from .stage import stage
from .tracking import READ, WRITTEN, FileDataset, log_files

SAMPLE_JET_FEATURES = ["pt_rel", "eta_rel", "mass_rel", "n_particles"]
# What the steps after the network changed, written into the file's attributes beside
# ``negative_pt_rel_clipped`` and ``rescale_pt_rel``, so that evaluation can say it next to the metrics.
POSTPROCESSING_FIGURES = ("negative_pt_rel_fraction", "pt_rel_sum_off_by_5pct_fraction", "unscaled_pt_rel_sum_over_fraction")


def template_rows(labels: np.ndarray, class_names: list[str], n_per_class: int, source: MaskSource,
                  rng: np.random.Generator) -> np.ndarray:
    """Rows of the template split (its ``labels``) whose masks (and context) the generated jets copy,
    ``n_per_class`` per class: drawn with replacement (``train``), or the class's first rows one for
    one (``test``, fewer if the split has fewer)."""
    rows = []
    for label, name in enumerate(class_names):
        of_class = np.flatnonzero(labels == label)
        if len(of_class) == 0:
            raise PipelineError(f"the {source.value} split has no jets of class {name}; preprocess a dataset that has them.")
        if source == MaskSource.train:
            rows.append(rng.choice(of_class, size=n_per_class, replace=True))
        else:
            rows.append(of_class[:n_per_class])
    return np.concatenate(rows)


def to_physical(x: np.ndarray, mask: np.ndarray, split: SetsSplit, feature_names: list[str],
                pt_rel_sum: np.ndarray | None = None) -> tuple[np.ndarray, dict]:
    """Un-normalise the model's output, clip negative ``pt_rel`` to 0, optionally scale each jet's
    ``pt_rel`` to add up to ``pt_rel_sum[jet]``, and sort particles by decreasing ``pt_rel`` (padded
    rows last, zero). Returns the particles and what was changed: ``negative_pt_rel`` (how many
    ``pt_rel`` were clipped; none with ``model.log_pt_rel``, whose ``pt_rel`` are positive by
    construction), and with ``pt_rel_sum`` the model's own sums before scaling, as ratios to the
    target (``pt_rel_sum_ratio``; NaN for a jet whose ``pt_rel`` are all 0, which is left as it is)."""
    particles = split.to_physical(x, mask)
    pt_rel = particles[..., feature_names.index("pt_rel")]
    negative = (pt_rel < 0) & mask
    pt_rel[negative] = 0.0
    changes = {"negative_pt_rel": int(negative.sum())}
    if pt_rel_sum is not None:
        generated_sum = pt_rel.sum(axis=1, dtype=np.float64)
        ratio = np.divide(generated_sum, pt_rel_sum, out=np.full_like(generated_sum, np.nan), where=generated_sum > 0)
        pt_rel *= np.where(np.isfinite(ratio), 1.0 / ratio, 1.0)[:, None].astype(pt_rel.dtype)
        changes["pt_rel_sum_ratio"] = ratio
    order = np.argsort(np.where(mask, -pt_rel, np.inf), axis=1, kind="stable")
    return np.take_along_axis(particles, order[..., None], axis=1).astype(np.float32), changes


@lru_cache
def data_parallel_sampler(model, **settings):
    """``setdiff.sample`` with ``settings`` (``pipeline.model.sampler_settings``) mapped over the local
    devices: ``(params, keys[n], mask[n, b, m], labels[n, b], context[n, b, c] | None)``. Cached, so
    sampling again in one process reuses the compilations."""
    return jax.pmap(partial(sample, model, **settings), in_axes=(None, 0, 0, 0, 0))


def template_path(cfg: DictConfig) -> Path:
    """The processed split whose jets' multiplicities the generated jets take (``sample.masks``)."""
    split = "train" if MaskSource(cfg.sample.masks) == MaskSource.train else "test"
    return Path(cfg.data.processed_dir) / f"{split}.h5"


def chosen_template_rows(cfg: DictConfig) -> np.ndarray:
    """The row of the template split (``template_path``) that each generated jet copies, in the order
    of the samples file: chosen from the labels alone (seeded by ``cfg.seed``), so that only those
    rows are read later (a train split need not fit in memory)."""
    labels = read_sets(template_path(cfg), datasets=("labels",))
    rng = np.random.default_rng(cfg.seed)
    return template_rows(labels["labels"], labels["class_names"], cfg.sample.n_jets, MaskSource(cfg.sample.masks), rng)


def generate(cfg: DictConfig, output_path: Path, progress: bool = True) -> dict:
    """Sample every class and write ``output_path``; returns the run's figures."""
    settings = sampler_settings(cfg.sample)
    processed = Path(cfg.data.processed_dir)
    template = template_path(cfg)
    for path in (template, processed / "normalisation.json"):
        if not path.is_file():
            raise PipelineError(f"{path} does not exist; run `python -m pipeline.preprocess data={cfg.data.name}` first.")
    chosen = chosen_template_rows(cfg)
    distinct, rows = np.unique(chosen, return_inverse=True)  # rows: positions in the distinct rows read
    split = SetsSplit(template, processed / "normalisation.json", cfg.model.use_jet_context, cfg.model.log_pt_rel, rows=distinct,
                      context_pt_rel_sum=cfg.model.context_pt_rel_sum, context_kept_mass=cfg.model.context_kept_mass)
    if split.feature_names != PARTICLE_FEATURES:
        raise PipelineError(f"{processed} holds features {split.feature_names}; sampling writes {PARTICLE_FEATURES}, preprocess again.")
    model, params, checkpoint = trained_model(cfg, split.x.shape[-1], len(split.class_names))

    if len(rows) < cfg.sample.n_jets * len(split.class_names):
        print(f"sample: the test split has fewer than {cfg.sample.n_jets} jets of some class; generating {len(rows)} jets, "
              "one per test jet", flush=True)
    n_devices = jax.local_device_count()
    batch_size = -(-cfg.sample.batch_size // n_devices) * n_devices  # a multiple of the device count
    draw = data_parallel_sampler(model, **settings)
    generated = np.zeros(split.x.shape[1:], np.float32)[None].repeat(len(rows), axis=0)
    key = jax.random.PRNGKey(cfg.seed)
    start = time.perf_counter()
    batches = batches_by_multiplicity(split, rows, batch_size)
    for batch_index, (positions, batch, n_used) in enumerate(tqdm(batches, total=-(-len(rows) // batch_size), desc="sample",
                                                                   unit="batch", disable=not (progress and sys.stderr.isatty()))):
        shard = lambda array: array.reshape(n_devices, -1, *array.shape[1:])  # noqa: E731
        device_keys = jax.random.split(jax.random.fold_in(key, batch_index), n_devices)
        x = draw(params, device_keys, shard(batch["mask"]), shard(batch["labels"]),
                 None if split.context is None else shard(batch["context"]))
        generated[positions, :n_used] = np.asarray(x).reshape(batch_size, n_used, -1)[: len(positions)]
    seconds = time.perf_counter() - start

    mask = split.mask[rows]
    target_sum = split.pt_rel_sum[rows] if cfg.sample.rescale_pt_rel else None
    particles, changes = to_physical(generated, mask, split, split.feature_names, target_sum)
    n_clipped = changes["negative_pt_rel"]
    jet = jet_from_relative_particles(*(particles[..., split.feature_names.index(name)] for name in PARTICLE_FEATURES), mask)
    jets = np.stack([jet["pt"], jet["eta"], jet["mass"], mask.sum(axis=1)], axis=1).astype(np.float32)
    figures = {
        "n_jets": len(rows),
        "seconds": seconds,
        "jets_per_s": len(rows) / seconds,
        "negative_pt_rel_fraction": n_clipped / max(int(mask.sum()), 1),
    }
    if "pt_rel_sum_ratio" in changes:  # how far the model's own momentum sums were from the template's
        ratio = changes["pt_rel_sum_ratio"]
        figures["pt_rel_sum_ratio_sd"] = float(np.nanstd(ratio))
        figures["pt_rel_sum_off_by_5pct_fraction"] = float(np.mean(~(np.abs(ratio - 1) <= 0.05)))
        figures["unscaled_pt_rel_sum_over_fraction"] = float(np.mean(np.nan_to_num(ratio) * target_sum > PT_REL_SUM_LIMIT))
    with write_sets(
        output_path, n_max=split.mask.shape[1], feature_names=split.feature_names, jet_feature_names=SAMPLE_JET_FEATURES,
        class_names=split.class_names, source=f"pipeline.sample of {checkpoint}", config=OmegaConf.to_yaml(cfg, resolve=True),
        **settings, masks=template.stem, negative_pt_rel_clipped=n_clipped, rescale_pt_rel=cfg.sample.rescale_pt_rel,
        **{name: figures[name] for name in POSTPROCESSING_FIGURES if name in figures},
    ) as writer:
        writer.append(particles, mask, jets, split.labels[rows])
    return figures


@hydra.main(config_path="conf", config_name="config", version_base="1.3")
def main(cfg: Config) -> None:
    with stage("sample", cfg) as output_dir:
        figures = generate(cfg, output_dir / "samples.h5")
        mlflow.log_metrics(figures)
        template, processed = template_path(cfg), Path(cfg.data.processed_dir)
        log_files(READ, [FileDataset(template, count_jets(template)), FileDataset(processed / "normalisation.json"),
                         FileDataset(Path(cfg.results_dir) / "train" / "checkpoint.json")])
        log_files(WRITTEN, [FileDataset(output_dir / "samples.h5", figures["n_jets"])])
        mlflow.log_dict(figures, "sample.json")
        print(f"sample: {figures['n_jets']} jets in {figures['seconds']:.1f} s ({figures['jets_per_s']:.0f} jets/s), "
              f"{100 * figures['negative_pt_rel_fraction']:.2f}% of pt_rel clipped at 0"
              + (f", {100 * figures['pt_rel_sum_off_by_5pct_fraction']:.1f}% of jets rescaled by more than 5% to their template's "
                 "momentum sum" if "pt_rel_sum_off_by_5pct_fraction" in figures else "")
              + f" -> {output_dir / 'samples.h5'}")


if __name__ == "__main__":
    main()
