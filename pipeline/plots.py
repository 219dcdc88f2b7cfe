"""Figures comparing real and generated jets, for the evaluation stage.

:func:`plot_comparison` takes two sets dicts (as :func:`pipeline.sets.read_sets` returns them) and
writes PNGs of the distributions the metrics compare: per jet the relative mass and pT (computed
from the particles with :func:`pipeline.jets.jet_from_relative_particles`, never read from the
``jets`` dataset, whose meaning differs between real and generated files) and the multiplicity;
per particle ``eta_rel``, ``phi_rel`` and ``pt_rel``. Every histogram is normalised to unit area,
binned over the real jets' 0.1-99.9 percentile range, and has a generated/real ratio panel below.
Padded rows never enter: every figure draws from :func:`plotted_values`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import matplotlib
import numpy as np
from matplotlib.colors import LogNorm

from .jets import jet_from_relative_particles
from .files import PipelineError, atomic_output

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

PARTICLE_FEATURES = ("eta_rel", "phi_rel", "pt_rel")
DPI = 120
N_BINS = 50
RATIO_RANGE = (0.5, 1.5)
REAL_STYLE = {"fill": True, "color": "0.75"}
GENERATED_STYLE = {"color": "tab:red", "linewidth": 1.5}
PANEL_SIZE = (4.5, 4.5)  # inches per column of a histogram figure
# Fixed margins, in inches, that fit the labels and two-line titles: laying a figure out from its
# drawn text (tight_layout) draws it twice, which made the evaluation's figures take half as long again.
HISTOGRAM_MARGINS = {"left": 0.75, "right": 0.15, "bottom": 0.5, "top": 0.6, "between_columns": 0.8, "between_rows": 0.1}
IMAGE_EDGES = np.linspace(-0.8, 0.8, 41)  # 40 x 40 pixels in (eta_rel, phi_rel)
IMAGE_DYNAMIC_RANGE = 1e-4  # colour scale spans [max * this, max]


@dataclass(frozen=True)
class Quantity:
    """One histogrammed quantity: ``name`` is its key in :func:`plotted_values` and its file name;
    ``metric`` the metric (``sample.<group>.<metric>``) that compares it, written as ``symbol``."""

    name: str
    label: str
    metric: str | None = None
    symbol: str = ""
    log_y: bool = False
    integer: bool = False


QUANTITIES = (
    Quantity("jet_mass", r"Jet relative mass $m/p_T^{jet}$", "w1m", r"$W_1^M$"),
    Quantity("jet_pt", r"Jet relative transverse momentum $p_T/p_T^{jet}$"),
    Quantity("multiplicity", "Number of particles per jet", integer=True),
    Quantity("eta_rel", r"Particle $\eta^{rel} = \eta - \eta^{jet}$", "w1p_eta_rel", r"$W_1^{\eta^{rel}}$"),
    Quantity("phi_rel", r"Particle $\phi^{rel} = \phi - \phi^{jet}$ [rad]", "w1p_phi_rel", r"$W_1^{\phi^{rel}}$"),
    Quantity("pt_rel", r"Particle $p_T^{rel} = p_T/p_T^{jet}$", "w1p_pt_rel", r"$W_1^{p_T^{rel}}$", log_y=True),
)


def plotted_values(sets: dict) -> dict[str, np.ndarray]:
    """The values the histograms show, from real particles only: per jet ``jet_mass`` (m/pT of the
    original jet), ``jet_pt`` (in units of the original jet pT) and ``multiplicity``; per valid
    particle ``eta_rel``, ``phi_rel`` and ``pt_rel``. Padded rows are zeroed before any sum."""
    mask = np.asarray(sets["mask"], dtype=bool)
    particles = np.where(mask[..., None], sets["particles"], 0.0)
    columns = [list(sets["feature_names"]).index(name) for name in PARTICLE_FEATURES]
    eta_rel, phi_rel, pt_rel = (particles[..., column] for column in columns)
    jet = jet_from_relative_particles(eta_rel, phi_rel, pt_rel, mask)
    return {
        "jet_mass": jet["mass"], "jet_pt": jet["pt"], "multiplicity": mask.sum(axis=1),
        "eta_rel": eta_rel[mask], "phi_rel": phi_rel[mask], "pt_rel": pt_rel[mask],
    }


def format_metric(symbol: str, value: float, std: float | None = None) -> str:
    """``symbol = (value ± std) × 10^k`` in matplotlib mathtext, with one power of ten for both."""
    exponent = int(np.floor(np.log10(abs(value)))) if np.isfinite(value) and value != 0 else 0
    scale = 10.0**exponent
    number = f"{value / scale:.2f}" if std is None else rf"({value / scale:.2f} $\pm$ {std / scale:.2f})"
    return f"{symbol} = {number}" + (rf" $\times 10^{{{exponent}}}$" if exponent else "")


def _metric_text(metrics: dict | None, group: str, quantity: Quantity) -> str:
    key = f"sample.{group}.{quantity.metric}"
    if not metrics or quantity.metric is None or key not in metrics:
        return ""
    return format_metric(quantity.symbol, metrics[key], metrics.get(f"{key}_std"))


def _bins(real_values: np.ndarray, integer: bool) -> np.ndarray:
    """Edges over the 0.1-99.9 percentile range of the real values (unit-wide bins on integers)."""
    finite = real_values[np.isfinite(real_values)]
    low, high = np.percentile(finite, [0.1, 99.9]) if finite.size else (0.0, 1.0)
    if integer:
        return np.arange(np.floor(low), np.ceil(high) + 2) - 0.5
    if high <= low:
        low, high = low - 0.5, high + 0.5
    return np.linspace(low, high, N_BINS + 1)


def _hep_style(axis) -> None:
    axis.minorticks_on()
    axis.tick_params(which="both", direction="in", top=True, right=True)


def histogram_with_ratio(main_axis, ratio_axis, real_values, generated_values, bins, *, real_label: str,
                         generated_label: str, log_y: bool = False) -> None:
    """Unit-area histograms of real (filled grey) and generated (red step) values on ``main_axis``;
    generated/real on ``ratio_axis``, with errors from Poisson counts,
    ``ratio * sqrt(1/n_generated + 1/n_real)`` per bin."""
    widths = np.diff(bins)
    real_counts = np.histogram(real_values, bins)[0]
    generated_counts = np.histogram(generated_values, bins)[0]
    real_density = real_counts / (max(real_counts.sum(), 1) * widths)
    generated_density = generated_counts / (max(generated_counts.sum(), 1) * widths)
    main_axis.stairs(real_density, bins, label=real_label, **REAL_STYLE)
    main_axis.stairs(generated_density, bins, label=generated_label, **GENERATED_STYLE)
    main_axis.set(ylabel="Density", yscale="log" if log_y else "linear")
    main_axis.legend(frameon=False)

    both = (real_counts > 0) & (generated_counts > 0)
    ratio = np.divide(generated_density, real_density, out=np.full(len(widths), np.nan), where=both)
    error = ratio * np.sqrt(1 / np.maximum(generated_counts, 1) + 1 / np.maximum(real_counts, 1))
    centres = 0.5 * (bins[:-1] + bins[1:])
    ratio_axis.errorbar(centres, ratio, yerr=error, fmt="o", markersize=2.5, color=GENERATED_STYLE["color"])
    ratio_axis.axhline(1.0, color="black", linewidth=0.8, linestyle="--")
    ratio_axis.set(ylim=RATIO_RANGE, ylabel="Gen. / Real")
    for axis in (main_axis, ratio_axis):
        _hep_style(axis)


def _save(fig, path: Path) -> Path:
    with atomic_output(path, "wb") as file:
        fig.savefig(file, format="png", dpi=DPI)
    plt.close(fig)
    return path


def plot_histograms(quantity: Quantity, panels: list[tuple[str, str, dict, dict]], metrics: dict | None,
                    labels: tuple[str, str], path: Path) -> Path:
    """One column per panel ``(title, metric group, real values, generated values)``: the real and
    generated distributions of ``quantity`` with their ratio below, the metric in the title."""
    columns = len(panels)
    width, height = PANEL_SIZE[0] * columns, PANEL_SIZE[1]
    margins = HISTOGRAM_MARGINS
    axis_width = (width - margins["left"] - margins["right"] - (columns - 1) * margins["between_columns"]) / columns
    axis_height = (height - margins["top"] - margins["bottom"] - margins["between_rows"]) / 2  # matplotlib's mean
    fig, axes = plt.subplots(
        2, columns, figsize=(width, height), sharex="col", squeeze=False,
        gridspec_kw={
            "height_ratios": [3, 1], "left": margins["left"] / width, "right": 1 - margins["right"] / width,
            "bottom": margins["bottom"] / height, "top": 1 - margins["top"] / height,
            "wspace": margins["between_columns"] / axis_width, "hspace": margins["between_rows"] / axis_height,
        },
    )
    for (title, group, real_values, generated_values), main_axis, ratio_axis in zip(panels, *axes):
        real, generated = real_values[quantity.name], generated_values[quantity.name]
        histogram_with_ratio(
            main_axis, ratio_axis, real, generated, _bins(real, quantity.integer),
            real_label=labels[0], generated_label=labels[1], log_y=quantity.log_y,
        )
        # At y = 1 as matplotlib would place it (the top ticks point inwards), given so that drawing
        # skips measuring the top axis for a title it would not move (the same pixels, 8% sooner).
        main_axis.set_title("\n".join(filter(None, [title, _metric_text(metrics, group, quantity)])), y=1.0)
        ratio_axis.set_xlabel(quantity.label)
    return _save(fig, path)


def mean_jet_image(values: dict) -> np.ndarray:
    """The pt_rel-weighted histogram of particles in (eta_rel, phi_rel), averaged over the jets,
    indexed ``[eta bin, phi bin]``."""
    image = np.histogram2d(values["eta_rel"], values["phi_rel"], bins=IMAGE_EDGES, weights=values["pt_rel"])[0]
    return image / max(len(values["multiplicity"]), 1)


def plot_jet_images(classes: dict[str, tuple[dict, dict]], labels: tuple[str, str], path: Path) -> Path:
    """Average jet images, rows real / generated, one column per class, on one log colour scale."""
    images = {name: [mean_jet_image(values) for values in pair] for name, pair in classes.items()}
    vmax = max(max(image.max() for image in pair) for pair in images.values())
    norm = LogNorm(vmin=vmax * IMAGE_DYNAMIC_RANGE, vmax=vmax) if vmax > 0 else None
    colormap = matplotlib.colormaps["viridis"]
    colormap = colormap.with_extremes(bad=colormap(0.0), under=colormap(0.0))
    fig, axes = plt.subplots(2, len(images), figsize=(3.5 * len(images) + 1, 6.5), squeeze=False,
                             sharex=True, sharey=True, layout="constrained")
    for column, (name, pair) in enumerate(images.items()):
        for row, (label, image) in enumerate(zip(labels, pair)):
            axis = axes[row, column]
            mesh = axis.pcolormesh(IMAGE_EDGES, IMAGE_EDGES, image.T, norm=norm, cmap=colormap)
            axis.set(title=f"{label}: {name}", aspect="equal", xlabel=r"$\eta^{rel}$", ylabel=r"$\phi^{rel}$ [rad]")
            axis.label_outer()
            _hep_style(axis)
    fig.colorbar(mesh, ax=axes.ravel().tolist(), label=r"mean $p_T^{rel}$ per pixel")
    return _save(fig, path)


def _select(sets: dict, jets: np.ndarray) -> dict:
    return {"particles": sets["particles"][jets], "mask": sets["mask"][jets], "feature_names": sets["feature_names"]}


def plot_comparison(real: dict, generated: dict, output_dir: Path, metrics: dict | None = None,
                    real_label: str = "Real (test split)", generated_label: str = "Generated") -> list[Path]:
    """Write every comparison figure into ``output_dir`` and return their paths, in this order:

    * ``<quantity>.png`` for each of :data:`QUANTITIES` (all jets; ``metrics`` group ``all``);
    * ``<quantity>_by_class.png``: the same, one column per class with jets on both sides;
    * ``jet_images.png``: average jet images per class, real above generated.

    Classes are matched by name; one without jets on either side is left out, and the per-class
    figures are skipped when no class has jets on both sides.
    """
    labels = (real_label, generated_label)
    for label, sets in zip(labels, (real, generated)):
        if len(sets["labels"]) == 0:
            raise PipelineError(f"{label} has no jets, so there is nothing to compare; rerun the stage that made it.")
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)

    everything = ("", "all", plotted_values(real), plotted_values(generated))
    classes = {}
    for name in real["class_names"]:
        if name not in generated["class_names"]:
            continue
        real_jets = real["labels"] == list(real["class_names"]).index(name)
        generated_jets = generated["labels"] == list(generated["class_names"]).index(name)
        if real_jets.any() and generated_jets.any():
            classes[name] = (plotted_values(_select(real, real_jets)), plotted_values(_select(generated, generated_jets)))

    paths = [plot_histograms(quantity, [everything], metrics, labels, output_dir / f"{quantity.name}.png")
             for quantity in QUANTITIES]
    if classes:
        by_class = [(name, name, *pair) for name, pair in classes.items()]
        paths += [plot_histograms(quantity, by_class, metrics, labels, output_dir / f"{quantity.name}_by_class.png")
                  for quantity in QUANTITIES]
        paths.append(plot_jet_images(classes, labels, output_dir / "jet_images.png"))
    return paths
