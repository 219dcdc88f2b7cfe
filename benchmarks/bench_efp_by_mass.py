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
  distribution itself is right says the model gives jets of that mass the wrong substructure;
* in the same bins, the jets' hardest particle (its mean pt_rel) and how far the two hardest lie
  from each other (their mean ΔR), real | generated: the core of the jet that the EFPs weigh most.

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
from pipeline.jets import delta_r
from pipeline.sets import read_sets


def drawn_jets(path: Path, label: int, n_jets: int, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """``n_jets`` jets of class ``label`` drawn without replacement: their EFPs ``[n_jets, 5]``, m/pT,
    and the pt_rel of their hardest particle and the ΔR between their two hardest (``[n_jets]`` each)."""
    of_class = np.flatnonzero(read_sets(path, datasets=("labels",))["labels"] == label)
    if len(of_class) < n_jets:
        raise SystemExit(f"{path} holds {len(of_class)} jets of class {label}, fewer than --jets {n_jets}; "
                         "lower --jets or sample more jets.")
    rows = np.sort(rng.choice(of_class, n_jets, replace=False))
    jets = read_sets(path, datasets=("particles", "mask"), rows=rows)
    particles, mask = jets["particles"], jets["mask"]
    columns = [jets["feature_names"].index(name) for name in ("eta_rel", "phi_rel", "pt_rel")]
    hardest_two = np.argsort(np.where(mask, -particles[..., columns[2]], np.inf), axis=1)[:, :2]
    eta, phi, pt_rel = np.take_along_axis(particles[..., columns], hardest_two[..., None], axis=1).transpose(2, 0, 1)
    return {
        "efps": metrics.energy_flow_polynomials(particles, mask)[:, metrics.w1efp_columns()],
        "mass": metrics.relative_jet_mass(particles, mask),
        "hardest_pt_rel": pt_rel[:, 0],
        "hardest_two_delta_r": delta_r(eta[:, 0], phi[:, 0], eta[:, 1], phi[:, 1]),
    }


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
        generated = drawn_jets(args.samples, label, args.jets, rng)
        test = drawn_jets(processed / "test.h5", label, args.jets, rng)
        train = drawn_jets(processed / "train.h5", label, args.jets, rng)
        print(f"\nclass {name}: W1 ×10⁵, generated | train, against test")
        print("| EFP | generated | truth | ratio |")
        print("|---|---|---|---|")
        for i in range(len(columns)):
            model_w1 = wasserstein_distance(generated["efps"][:, i], test["efps"][:, i])
            truth_w1 = wasserstein_distance(train["efps"][:, i], test["efps"][:, i])
            print(f"| {i} | {1e5 * model_w1:.3g} | {1e5 * truth_w1:.3g} | {model_w1 / truth_w1:.2f} |")
        print(f"\nclass {name}: by m/pT, mean EFP of generated jets / of test jets; hardest particle's pt_rel and "
              "ΔR of the two hardest, test | generated")
        print("| m/pT | test jets | generated jets | " + " | ".join(f"EFP {i}" for i in range(len(columns)))
              + " | hardest pt_rel | ΔR of the two hardest |")
        print("|---|---|---|" + "---|" * (len(columns) + 2))
        for low, high in zip(edges[:-1], edges[1:]):
            in_test = (test["mass"] >= low) & (test["mass"] < high)
            in_generated = (generated["mass"] >= low) & (generated["mass"] < high)
            if in_test.sum() < 50 or in_generated.sum() < 50:
                continue
            ratios = generated["efps"][in_generated].mean(axis=0) / test["efps"][in_test].mean(axis=0)
            core = [f"{test[key][in_test].mean():.3f} \\| {generated[key][in_generated].mean():.3f}"
                    for key in ("hardest_pt_rel", "hardest_two_delta_r")]
            print(f"| {low:.2f}-{high:.2f} | {in_test.sum()} | {in_generated.sum()} | "
                  + " | ".join(f"{ratio:.2f}" for ratio in ratios) + " | " + " | ".join(core) + " |")


if __name__ == "__main__":
    main()
