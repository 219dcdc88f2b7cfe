"""Where the W1EFP of generated jets comes from: each of its five EFPs, and each in bins of jet mass.

    python benchmarks/bench_efp_by_mass.py <samples.h5> [--jets 20000] [--bins 0 0.32 0.04]

W1EFP (``pipeline.metrics.w1efp``) averages the W1 distances of five energy flow polynomials (the
``W1_EFP_GRAPHS`` of ``pipeline.metrics``: the degree-4 EFPs of four vertices, Komiske, Metodiev
& Thaler 2018, arXiv:1712.07124). Their average hides which structure a model misses. For every
class this script draws the same number of jets from the generated sample, the test split and
the train split (the splits the samples file's configuration names) and prints:

* each EFP's W1 of generated against test jets and of train against test jets (the truth floor),
  one W1 of the whole draw each, not the metrics file's bootstrap;
* each EFP's mean over the generated jets over its mean over the test jets, in bins of the jet's
  relative mass m/pT (``pipeline.metrics.relative_jet_mass``): a ratio away from 1 where the mass
  distribution itself is right says the model gives jets of that mass the wrong substructure.

Prints tables; figures go in benchmarks/README.md.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import energyflow
import h5py
import numpy as np
from omegaconf import OmegaConf
from scipy.stats import wasserstein_distance

from pipeline import metrics
from pipeline.sets import read_sets


def drawn_jets(path: Path, label: int, n_jets: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """(EFPs ``[n_jets, 5]``, m/pT ``[n_jets]``) of ``n_jets`` jets of class ``label`` drawn without replacement."""
    labels = read_sets(path, datasets=("labels",))["labels"]
    rows = np.sort(rng.choice(np.flatnonzero(labels == label), n_jets, replace=False))
    jets = read_sets(path, datasets=("particles", "mask"), rows=rows)
    efps = metrics.energy_flow_polynomials(jets["particles"], jets["mask"])[:, metrics.w1efp_columns()]
    return efps, metrics.relative_jet_mass(jets["particles"], jets["mask"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("samples", type=Path, help="a samples file written by pipeline.sample")
    parser.add_argument("--jets", type=int, default=20_000, help="jets per class and side (default 20 000)")
    parser.add_argument("--bins", type=float, nargs=3, default=(0.0, 0.32, 0.04), metavar=("FIRST", "LAST", "WIDTH"),
                        help="edges of the m/pT bins (default: 0 to 0.32 in steps of 0.04)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    with h5py.File(args.samples, "r") as file:
        cfg = OmegaConf.create(file.attrs["config"])
    processed = Path(cfg.data.processed_dir)
    class_names = list(read_sets(args.samples, datasets=())["class_names"])
    columns = metrics.w1efp_columns()
    graphs = energyflow.EFPSet(*metrics.W1_EFP_GRAPHS).graphs()  # in the order of w1efp_columns()
    edges = np.arange(args.bins[0], args.bins[1] + args.bins[2] / 2, args.bins[2])
    rng = np.random.default_rng(args.seed)

    print(f"{args.samples}: the five EFPs of W1EFP, {args.jets} jets per class and side")
    for i, graph in enumerate(graphs):
        print(f"- EFP {i}: edges {[tuple(map(int, edge)) for edge in graph]}")
    for label, name in enumerate(class_names):
        generated, generated_mass = drawn_jets(args.samples, label, args.jets, rng)
        test, test_mass = drawn_jets(processed / "test.h5", label, args.jets, rng)
        train, _ = drawn_jets(processed / "train.h5", label, args.jets, rng)
        print(f"\nclass {name}: W1 ×10⁵, generated | train, against test")
        print("| EFP | generated | truth | ratio |")
        print("|---|---|---|---|")
        for i in range(len(columns)):
            model_w1 = wasserstein_distance(generated[:, i], test[:, i])
            truth_w1 = wasserstein_distance(train[:, i], test[:, i])
            print(f"| {i} | {1e5 * model_w1:.3g} | {1e5 * truth_w1:.3g} | {model_w1 / truth_w1:.2f} |")
        print(f"\nclass {name}: mean EFP of generated jets / of test jets, by m/pT")
        print("| m/pT | test jets | generated jets | " + " | ".join(f"EFP {i}" for i in range(len(columns))) + " |")
        print("|---|---|---|" + "---|" * len(columns))
        for low, high in zip(edges[:-1], edges[1:]):
            in_test = (test_mass >= low) & (test_mass < high)
            in_generated = (generated_mass >= low) & (generated_mass < high)
            if in_test.sum() < 50 or in_generated.sum() < 50:
                continue
            ratios = generated[in_generated].mean(axis=0) / test[in_test].mean(axis=0)
            print(f"| {low:.2f}-{high:.2f} | {in_test.sum()} | {in_generated.sum()} | "
                  + " | ".join(f"{ratio:.2f}" for ratio in ratios) + " |")


if __name__ == "__main__":
    main()
