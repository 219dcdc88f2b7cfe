"""How a model conditioned on jet features (``model.use_jet_context=true``) makes each jet's mass,
against the real jet whose features it was given.

    python benchmarks/bench_jet_mass_given_context.py <samples.h5> [--bins 0 0.3 0.02]

Every generated jet copies a template jet of the train (or test) split: its multiplicity and its
features, the jet's pT and mass over all its constituents among them. This script finds each
generated jet's template again (``pipeline.sample.chosen_template_rows``, from the configuration
the samples file records) and compares, class by class, three relative masses (m/pT): the
generated jet's from its particles, the template's from its own (at most ``n_max``) particles, and
the template's over all its constituents (the context). A model that has learnt p(particles |
features) gives generated masses that scatter about the context as the template's own masses do,
with the same mean, spread and shape; the W1 of the generated masses against the templates' own
is then at the level of the truth floor. A model trained with ``model.context_kept_mass`` was given
the template's own mass instead of the context's: the spread of generated − own is then how far the
network misses the mass it was asked for. The histogram rows show where the two differ; the last
table, how the shortfall m − m_context depends on the context, bin by bin of m_context: its mean,
spread and skewness, and its correlation with the template's sum of pt_rel over its kept particles.
Prints tables; figures go in benchmarks/README.md.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import h5py
import numpy as np
from omegaconf import OmegaConf
from scipy.stats import skew, wasserstein_distance

from pipeline.jets import jet_from_relative_particles
from pipeline.sample import chosen_template_rows, template_path
from pipeline.sets import read_sets


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("samples", type=Path, help="a samples file written by pipeline.sample")
    parser.add_argument("--bins", type=float, nargs=3, default=(0.0, 0.3, 0.02), metavar=("FIRST", "LAST", "WIDTH"),
                        help="edges of the m/pT histogram (default: 0 to 0.3 in steps of 0.02)")
    parser.add_argument("--min-jets", type=int, default=1000,
                        help="bins of m_context/pT with fewer jets of a class are left out of the last table")
    args = parser.parse_args()

    with h5py.File(args.samples, "r") as file:
        cfg = OmegaConf.create(file.attrs["config"])
    if not cfg.model.use_jet_context:
        raise SystemExit(f"{args.samples} was generated without jet features as context; nothing to compare.")
    generated = read_sets(args.samples, datasets=("jets", "labels"))
    chosen = chosen_template_rows(cfg)
    distinct, positions = np.unique(chosen, return_inverse=True)
    template = read_sets(template_path(cfg), datasets=("particles", "mask", "jets", "labels"), rows=distinct)
    if not np.array_equal(template["labels"][positions], generated["labels"]):
        raise SystemExit(f"the template rows found again do not match the classes of {args.samples}; "
                         "was the template split preprocessed again since?")
    features = template["feature_names"]
    own = jet_from_relative_particles(*(template["particles"][..., features.index(name)]
                                        for name in ("eta_rel", "phi_rel", "pt_rel")), template["mask"])["mass"][positions]
    pt_rel_sum = template["particles"][..., features.index("pt_rel")].sum(axis=1, where=template["mask"])[positions]
    jet_features = template["jet_feature_names"]
    context = (template["jets"][:, jet_features.index("mass")] / template["jets"][:, jet_features.index("pt")])[positions]
    made = generated["jets"][:, generated["jet_feature_names"].index("mass_rel")]

    print(f"{args.samples}: m/pT of each generated jet against its template jet")
    print("| class | jets | W1 generated vs template's own x10³ | correlation | sd of generated − template's own "
          "| mean, sd of m − m_context: template's own | generated |")
    print("|---|---|---|---|---|---|---|")
    edges = np.arange(args.bins[0], args.bins[1] + args.bins[2] / 2, args.bins[2])
    histograms = {}
    for label, name in enumerate(generated["class_names"]):
        of_class = generated["labels"] == label
        real_offset, made_offset = own[of_class] - context[of_class], made[of_class] - context[of_class]
        print(f"| {name} | {of_class.sum()} | {1e3 * wasserstein_distance(made[of_class], own[of_class]):.3g} "
              f"| {np.corrcoef(made[of_class], own[of_class])[0, 1]:.3f} | {(made[of_class] - own[of_class]).std():.4f} "
              f"| {real_offset.mean():.4f}, {real_offset.std():.4f} | {made_offset.mean():.4f}, {made_offset.std():.4f} |")
        histograms[name] = (np.histogram(made[of_class], edges)[0], np.histogram(own[of_class], edges)[0])
    print()
    print("| m/pT | " + " | ".join(f"{name}: generated, template's own, ratio" for name in histograms) + " |")
    print("|---|" + "---|" * len(histograms))
    for index, low in enumerate(edges[:-1]):
        cells = []
        for made_counts, own_counts in histograms.values():
            ratio = f"{made_counts[index] / own_counts[index]:.2f}" if own_counts[index] else "-"
            cells.append(f"{made_counts[index]}, {own_counts[index]}, {ratio}")
        print(f"| {low:.2f}-{edges[index + 1]:.2f} | " + " | ".join(cells) + " |")

    # Where the shortfall m - m_context goes wrong, for jets of similar context: its mean, spread and
    # skewness, and how it follows the share of the jet's pT its kept particles carry (the template's
    # sum of pt_rel; below 1 where particles past n_max were dropped).
    print()
    print("| class | m_context/pT | jets | m − m_context, template's own: mean, sd | generated: mean, sd | difference of the means "
          "| skewness: own, generated | correlation with the template's Σpt_rel: own, generated |")
    print("|---|---|---|---|---|---|---|---|")
    for label, name in enumerate(generated["class_names"]):
        for index, low in enumerate(edges[:-1]):
            of_bin = (generated["labels"] == label) & (context >= low) & (context < edges[index + 1])
            if of_bin.sum() < args.min_jets:
                continue
            real_offset, made_offset = own[of_bin] - context[of_bin], made[of_bin] - context[of_bin]
            print(f"| {name} | {low:.2f}-{edges[index + 1]:.2f} | {of_bin.sum()} | {real_offset.mean():.4f}, {real_offset.std():.4f} "
                  f"| {made_offset.mean():.4f}, {made_offset.std():.4f} | {made_offset.mean() - real_offset.mean():+.4f} "
                  f"| {skew(real_offset):.2f}, {skew(made_offset):.2f} "
                  f"| {np.corrcoef(real_offset, pt_rel_sum[of_bin])[0, 1]:.3f}, {np.corrcoef(made_offset, pt_rel_sum[of_bin])[0, 1]:.3f} |")


if __name__ == "__main__":
    main()
