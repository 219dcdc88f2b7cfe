"""Evaluation stage: the community's physics metrics for generated jets, with the truth floor beside them.

``python -m pipeline.evaluate experiment=<name>`` scores ``results/<experiment>/sample/samples.h5``
against the dataset's held-out test split; ``evaluate.samples=<path> evaluate.reference=<path>``
scores any two sets files. In the same run the test split is scored against the train split
(``evaluate.truth``), the "truth" comparison: two independent samples of the real distribution,
so its numbers are the floor that a perfect model would reach with these sample sizes.

Every metric is computed by ``pipeline.metrics`` (definitions of the JetNet library, Kansal et al.
2021 arXiv:2106.11535 and 2023 arXiv:2211.10295) on all jets and, with ``evaluate.per_class``, on
each class, from the particles alone (jet mass included), so real and generated jets are treated
identically. EFPs are computed once per file and shared by ``w1efp`` (the 5 EFPs with n = 4,
d = 4) and FPD/KPD (all 36 with d <= 4). Each file is read whole, or a seeded random subset of
``evaluate.max_jets`` jets of it.

Outputs in ``results/<experiment>/evaluate/``: ``metrics.json``, a flat dict with keys
``<comparison>.<group>.<metric>``, where comparison is ``sample`` (samples vs reference) or
``truth`` (truth vs reference), group is ``all`` or a class name, and metric is one of

=========================== ===============================================================
``w1m``, ``w1m_std``         W1 of the relative jet mass m/pT_jet (mean, std over batches)
``w1p_<feature>[_std]``      W1 of each particle feature (eta_rel, phi_rel, pt_rel)
``w1p``, ``w1p_std``         the mean of those three (and of their std)
``w1efp``, ``w1efp_std``     the mean W1 of the 5 EFPs n = 4, d = 4 (and of their std)
``fpd``, ``fpd_err``         Frechet physics distance on the 36 EFPs, extrapolated to N -> inf
``fpd_min_jets``,            the smallest and largest FPD batch N used: ``evaluate.fpd_min_jets``
``fpd_max_jets``             to ``fpd_max_jets``, scaled down to end at the smaller sample
``fpd_capped``               1 when they were scaled down, else 0
``kpd``, ``kpd_err``         kernel physics distance: median MMD^2, half the 68% range
``cov``, ``cov_std``         coverage with the EMD between jets (1 is ideal)
``mmd``, ``mmd_std``         minimum matching EMD (in units of pT_jet)
``n_reference``, ``n_other`` jets of each side in the group
``far_particles``            the other side's fraction of particles beyond Delta R 1.0 of the axis
``pt_rel_sum_over``          the other side's fraction of jets whose pt_rel add up past 1.05
=========================== ===============================================================

The last two count what the distances do not show one by one: generated particles outside the
jet's reach, and jets with more momentum than the jet (``metrics.unphysical_fractions``); real jets
score ~0 on both, and the truth row says how close to 0.

plus ``metrics.md`` and ``metrics.tsv`` (the table in the units papers quote; ``metrics.md`` also
says how each metric drew its batches, which FPD batch sizes each row used and, for a file of
``pipeline.sample``, what sampling changed after the network: clipped and rescaled ``pt_rel``) and ``plots/``
(``pipeline.plots``: samples vs reference). All values and plots go to the MLflow run.

FPD batches are drawn without replacement, so they hold at most the smaller sample; when
``evaluate.fpd_max_jets`` exceeds it the batch sizes are scaled down (``metrics.fpd_batch_sizes``)
and ``fpd_capped`` says so. Two FPDs are comparable as estimates of the same N -> inf limit at any
sample sizes, but their errors shrink with the jets behind them. The W1 metrics draw
``evaluate.n_jets`` with replacement (JetNet's definition): W1 of two finite samples of one
distribution is above zero by an amount that falls with the jets in each (the batch size cannot
add jets a sample does not hold), so compare W1 values, and the truth floor, at equal
``n_reference`` and ``n_other``.
"""

from __future__ import annotations

import json
from pathlib import Path

import hydra
import mlflow
import numpy as np
from omegaconf import DictConfig

from . import metrics as jet_metrics
from .config import PARTICLE_FEATURES, Config
from .plots import plot_comparison
from .sets import count_jets, open_sets, read_sets
from .files import PipelineError, atomic_output
from .jets import PT_REL_SUM_LIMIT
from .stage import stage
from .tracking import READ, WRITTEN, FileDataset, log_files

COMPARISONS = ("sample", "truth")
# Markdown columns: (title, metric key, scale). Scales as the JetNet papers quote the metrics.
TABLE_COLUMNS = (
    ("W1M ×10³", "w1m", 1e3),
    ("W1P ×10³", "w1p", 1e3),
    ("W1EFP ×10⁵", "w1efp", 1e5),
    ("FPD ×10³", "fpd", 1e3),
    ("KPD ×10³", "kpd", 1e3),
    ("COV", "cov", 1.0),
    ("MMD ×10³", "mmd", 1e3),
    ("ΔR > 1 %", "far_particles", 1e2),
    ("Σpt_rel > 1.05 %", "pt_rel_sum_over", 1e2),
)
UNCERTAINTY = {"fpd": "fpd_err", "kpd": "kpd_err", "far_particles": None, "pt_rel_sum_over": None}  # the others: "<metric>_std"
COMPARISON_TITLES = {"sample": "model vs test", "truth": "train vs test (truth)"}


def input_paths(cfg: DictConfig) -> dict[str, Path | None]:
    """The files to score: samples, reference and truth (``None``: no truth comparison)."""
    processed = Path(cfg.data.processed_dir)
    paths = {
        "samples": Path(cfg.evaluate.samples or Path(cfg.results_dir) / "sample" / "samples.h5"),
        "reference": Path(cfg.evaluate.reference or processed / "test.h5"),
        "truth": Path(cfg.evaluate.truth or processed / "train.h5"),
    }
    for role, path in paths.items():
        if not path.is_file():
            if role == "truth" and not cfg.evaluate.truth:
                paths[role] = None  # only an explicitly named truth file must exist
                continue
            hint = {"samples": f"run `python -m pipeline.sample experiment={cfg.name}` first or set evaluate.samples",
                    "reference": f"run `python -m pipeline.preprocess data={cfg.data.name}` first or set evaluate.reference",
                    "truth": "set evaluate.truth to an existing sets file"}[role]
            raise PipelineError(f"the {role} file {path} does not exist; {hint}.")
    return paths


def load(path: Path, max_jets: int, rng: np.random.Generator) -> dict:
    """A sets file, or a seeded random subset of ``max_jets`` of its jets (in file order), read
    without holding the rest of the file in memory."""
    with open_sets(path) as file:
        n_jets = len(file["labels"])
    keep = np.sort(rng.choice(n_jets, size=max_jets, replace=False)) if n_jets > max_jets else None
    sets = read_sets(path, rows=keep)
    if list(sets["feature_names"]) != PARTICLE_FEATURES:
        raise PipelineError(f"{path} holds particle features {sets['feature_names']}; the metrics need {PARTICLE_FEATURES}.")
    return sets


def class_rows(sets: dict, class_name: str) -> np.ndarray:
    if class_name not in sets["class_names"]:
        return np.zeros(0, int)
    return np.flatnonzero(sets["labels"] == list(sets["class_names"]).index(class_name))


def compare(reference: dict, other: dict, reference_efps: np.ndarray, other_efps: np.ndarray, settings: DictConfig,
            rng: np.random.Generator) -> dict[str, float]:
    """Every metric of ``other`` against ``reference`` (sets dicts with their 36 EFPs per jet)."""
    real = (reference["particles"], reference["mask"])
    generated = (other["particles"], other["mask"])
    n_jets, batches = settings.n_jets, settings.w1_batches
    values = {"n_reference": float(len(reference["labels"])), "n_other": float(len(other["labels"]))}
    values["w1m"], values["w1m_std"] = jet_metrics.w1m(*real, *generated, batches, n_jets, rng)
    means, stds = jet_metrics.w1p(*real, *generated, batches, n_jets, rng)
    for feature, mean, std in zip(PARTICLE_FEATURES, means, stds):
        values[f"w1p_{feature}"], values[f"w1p_{feature}_std"] = mean, std
    values["w1p"], values["w1p_std"] = np.mean(means), np.mean(stds)
    columns = jet_metrics.w1efp_columns()
    means, stds = jet_metrics.w1efp(reference_efps[:, columns], other_efps[:, columns], batches, n_jets, rng)
    values["w1efp"], values["w1efp_std"] = np.mean(means), np.mean(stds)
    values["fpd"], values["fpd_err"] = jet_metrics.fpd(
        reference_efps, other_efps, min_jets=settings.fpd_min_jets, max_jets=settings.fpd_max_jets,
        n_points=settings.fpd_points, n_batches=settings.fpd_batches, rng=rng,
    )
    fpd_batch_sizes = jet_metrics.fpd_batch_sizes(len(reference_efps), len(other_efps), settings.fpd_min_jets,
                                                  settings.fpd_max_jets, settings.fpd_points)
    values["fpd_min_jets"], values["fpd_max_jets"] = fpd_batch_sizes[0], fpd_batch_sizes[-1]
    values["fpd_capped"] = float(fpd_batch_sizes[-1] < settings.fpd_max_jets)
    values["kpd"], values["kpd_err"] = jet_metrics.kpd(
        reference_efps, other_efps, n_batches=settings.kpd_batches, n_per_batch=settings.kpd_jets, rng=rng
    )
    coverage = jet_metrics.cov_mmd(*real, *generated, n_per_batch=settings.cov_mmd_jets, n_batches=settings.cov_mmd_batches,
                                   rng=rng, n_jobs=settings.emd_jobs)
    values.update(coverage)
    values.update(jet_metrics.unphysical_fractions(*generated))
    return {name: float(value) for name, value in values.items()}


def subset(sets: dict, efps: np.ndarray, rows: np.ndarray) -> tuple[dict, np.ndarray]:
    return {**sets, **{name: sets[name][rows] for name in ("particles", "mask", "jets", "labels")}}, efps[rows]


def evaluate(cfg: DictConfig, paths: dict[str, Path | None]) -> tuple[dict[str, float], dict, dict]:
    """All metrics of every comparison and group; also returns the reference and samples for plotting."""
    settings = cfg.evaluate
    seeds = np.random.SeedSequence(cfg.seed).spawn(4)
    files = {role: load(path, settings.max_jets, np.random.default_rng(seed))
             for (role, path), seed in zip(paths.items(), seeds) if path is not None}
    efps = {role: jet_metrics.energy_flow_polynomials(sets["particles"], sets["mask"])
            for role, sets in files.items()}
    reference = files["reference"]
    groups = ["all"]
    if settings.per_class and len(reference["class_names"]) > 1:
        groups += list(reference["class_names"])
    results = {}
    for comparison, role in zip(COMPARISONS, ("samples", "truth")):
        if role not in files:
            continue
        for group_index, group in enumerate(groups):
            rng = np.random.default_rng([cfg.seed, COMPARISONS.index(comparison), group_index])
            if group == "all":
                real, real_efps, other, other_efps = reference, efps["reference"], files[role], efps[role]
            else:
                real, real_efps = subset(reference, efps["reference"], class_rows(reference, group))
                other, other_efps = subset(files[role], efps[role], class_rows(files[role], group))
                if len(real["labels"]) == 0 or len(other["labels"]) == 0:
                    print(f"evaluate: class {group} is missing from {paths[role] if len(other['labels']) == 0 else paths['reference']}; not scored")
                    continue
            scores = compare(real, other, real_efps, other_efps, settings, rng)
            results.update({f"{comparison}.{group}.{metric}": value for metric, value in scores.items()})
    return results, reference, files["samples"]


def table_rows(metrics: dict[str, float]) -> tuple[list[str], list[list[str]]]:
    """The metrics as a table in the units papers quote: the header and one row per comparison and
    group (in the order they were computed), each cell ``value ± uncertainty``."""
    header = ["comparison", "jets", *(title for title, _, _ in TABLE_COLUMNS)]
    rows = []
    for row in dict.fromkeys(key.rsplit(".", 1)[0] for key in metrics):
        comparison, group = row.split(".")
        cells = [COMPARISON_TITLES[comparison], group]
        for _, metric, scale in TABLE_COLUMNS:
            value, error = metrics.get(f"{row}.{metric}"), metrics.get(f"{row}.{UNCERTAINTY.get(metric, metric + '_std')}")
            if value is None:
                cells.append("")
            else:
                cells.append(f"{value * scale:.3g}" if error is None else f"{value * scale:.3g} ± {error * scale:.2g}")
        rows.append(cells)
    return header, rows


def markdown_table(metrics: dict[str, float]) -> str:
    header, rows = table_rows(metrics)
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in rows]) + "\n"


def table_notes(metrics: dict[str, float], settings: DictConfig) -> str:
    """How each metric of the table drew its batches, and the FPD batch sizes of each row (capped or not)."""
    lines = [
        f"- W1M, W1P, W1EFP: {settings.w1_batches} batches of {settings.n_jets} jets per side, drawn with replacement "
        "(JetNet's definition); W1 of two finite samples of one distribution is above zero by an amount that falls with "
        "the jets each holds, so compare W1 rows only at equal jet counts.",
        f"- FPD: {settings.fpd_points} batch sizes N evenly spaced in 1/N, {settings.fpd_batches} batches of N jets per "
        f"side at each, drawn without replacement, extrapolated to N -> inf; configured N from {settings.fpd_min_jets} to "
        f"{settings.fpd_max_jets}, both scaled down to end at the smaller sample where it holds fewer than {settings.fpd_max_jets} "
        "jets (capped):",
    ]
    for row in dict.fromkeys(key.rsplit(".", 1)[0] for key in metrics):
        comparison, group = row.split(".")
        sizes = f"N from {metrics[f'{row}.fpd_min_jets']:.0f} to {metrics[f'{row}.fpd_max_jets']:.0f}"
        capped = "capped" if metrics[f"{row}.fpd_capped"] else "as configured"
        jets = f"{metrics[f'{row}.n_reference']:.0f} reference and {metrics[f'{row}.n_other']:.0f} other jets"
        lines.append(f"  - {COMPARISON_TITLES[comparison]}, {group}: {sizes} ({capped}; {jets})")
    lines.append(
        f"- KPD: {settings.kpd_batches} batches of {settings.kpd_jets} jets per side, drawn with replacement; pairs of "
        "one jet drawn twice are left out of the MMD^2, so repeats do not bias it."
    )
    lines.append(f"- COV, MMD: {settings.cov_mmd_batches} batches of {settings.cov_mmd_jets} jets per side, drawn with replacement.")
    return "\n".join(lines) + "\n"


def sampling_notes(samples: dict) -> str:
    """What ``pipeline.sample`` did to the network's particles before writing them (from the samples
    file's attributes; empty for a file that stage did not write): the table scores the jets after it."""
    if "negative_pt_rel_clipped" not in samples:
        return ""
    clipped = f"{samples['negative_pt_rel_clipped']} particles"
    if "negative_pt_rel_fraction" in samples:
        clipped += f", {samples['negative_pt_rel_fraction']:.2%} of the generated particles"
    lines = [f"- pt_rel below 0 set to 0: {clipped}."]
    if not samples.get("rescale_pt_rel"):
        lines.append("- pt_rel as the network made them (sample.rescale_pt_rel=false).")
    else:
        line = "- Each jet's pt_rel scaled to add up to its template jet's sum (sample.rescale_pt_rel=true)"
        if "pt_rel_sum_off_by_5pct_fraction" in samples:
            line += (f"; the network's own sums were more than 5% off for {samples['pt_rel_sum_off_by_5pct_fraction']:.1%} of "
                     f"the jets and past {PT_REL_SUM_LIMIT} for {samples['unscaled_pt_rel_sum_over_fraction']:.2%} of them")
        lines.append(line + ".")
    return "\n".join(lines) + "\n"


def tab_separated_table(metrics: dict[str, float]) -> str:
    header, rows = table_rows(metrics)
    return "\n".join("\t".join(cells) for cells in [header, *rows]) + "\n"


@hydra.main(config_path="conf", config_name="config", version_base="1.3")
def main(cfg: Config) -> None:
    with stage("evaluate", cfg) as output_dir:
        paths = input_paths(cfg)
        try:
            metrics, reference, samples = evaluate(cfg, paths)
        except ValueError as error:  # the metrics' checks of their input (an empty sample, too few jets, ...)
            raise PipelineError(str(error)) from None
        table = markdown_table(metrics)
        with atomic_output(output_dir / "metrics.json") as file:
            json.dump(metrics, file, indent=2)
        with atomic_output(output_dir / "metrics.md") as file:
            file.write(f"Samples: {paths['samples']}\nReference: {paths['reference']}\nTruth: {paths['truth']}\n\n{table}\n"
                       f"Batches:\n\n{table_notes(metrics, cfg.evaluate)}")
            changed = sampling_notes(samples)
            if changed:
                file.write(f"\nWhat sampling changed after the network (the table scores the jets as written):\n\n{changed}")
        with atomic_output(output_dir / "metrics.tsv") as file:
            file.write(tab_separated_table(metrics))
        plots = plot_comparison(reference, samples, output_dir / "plots", metrics)
        mlflow.log_metrics(metrics)
        log_files(READ, [FileDataset(path, count_jets(path)) for path in paths.values() if path is not None])
        log_files(WRITTEN, [FileDataset(output_dir / "metrics.json")])
        mlflow.log_artifact(str(output_dir / "metrics.json"))
        mlflow.log_artifact(str(output_dir / "metrics.md"))
        mlflow.log_artifact(str(output_dir / "metrics.tsv"))
        for plot in plots:
            mlflow.log_artifact(str(plot), "plots")
        print(table, end="")


if __name__ == "__main__":
    main()
