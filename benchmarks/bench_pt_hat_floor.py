"""What the pT-hat floor of ``pipeline.generate`` loses of the jet-pT window, and what lowering it costs.

    python benchmarks/bench_pt_hat_floor.py [--events 20000] [--jets 300] [--classes g q t] [--floors 0.9 0.8 0.7 0.6]

Pythia's ``PhaseSpace:pTHatMin`` is a cut on the hard process alone: every later step of an event
(showers, multi-parton interactions, hadronisation) depends only on that event's hard process. So
the jets of a run with floor ``F`` are, in distribution, exactly the jets of a run with a lower floor
whose events have pT-hat >= ``F``. One reference run per class (``--events`` events), at
REFERENCE_FLOOR x ``jet_pt_min`` and with no pT-hat cap, with every accepted jet tagged by its
event's pT-hat, therefore measures every candidate floor at once, on the same events: in each
jet-pT bin of the window, the fraction of jets that a run with floor ``F`` would never make (two
independent runs would need far more jets to resolve a difference of a few percent). The same jets
give the fraction above the stage's pT-hat cap (1.2 x ``jet_pt_max``). The reference run samples
pT-hat with Pythia's bias (``PhaseSpace:bias2Selection``) and weights every event by its inverse, so
fractions are weighted, with their standard errors and the effective number of jets,
(sum w)^2 / sum w^2. A fraction of 0.0 ± 0.0% means no jet of the bin came from below that floor;
3 / effective jets is then a 95% upper limit.

Then the cost: the stage's ``generate_shard`` at each candidate floor, timed for ``--jets`` jets per
class (Pythia events per accepted jet is the part that does not depend on the machine's load).

Prints two tables; figures go in benchmarks/README.md.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import awkward as ak
import numpy as np
from hydra import compose, initialize_config_dir

import pipeline
from pipeline.generate import generate_shard, pythia_settings, select_jets, shard_seed, start_pythia

REFERENCE_FLOOR = 0.5  # x jet_pt_min
# The reference run samples pT-hat with Pythia's bias (pT-hat / jet_pt_min)^BIAS_POWER and weights
# every event by its inverse, so events near the window are ~10x more frequent than unbiased.
BIAS_POWER = 5
BIN_WIDTH = 20.0  # GeV
LOW_BINS = 3  # jet-pT bins reported from the bottom of the window (and the top bin, for the cap)


def generator_config(*overrides: str):
    with initialize_config_dir(str(Path(pipeline.__file__).parent / "conf"), version_base="1.3"):
        return compose("config", overrides=list(overrides)).data.generator


def reference_jets(class_name: str, n_events: int) -> dict[str, np.ndarray]:
    """Accepted jets of ``n_events`` events with pT-hat >= REFERENCE_FLOOR x jet_pt_min and no cap:
    each jet's pT, its event's pT-hat and its event's weight."""
    generator = generator_config(f"data.generator.pt_hat_min_fraction={REFERENCE_FLOOR}")
    bias = ["PhaseSpace:bias2Selection = on", f"PhaseSpace:bias2SelectionPow = {BIAS_POWER}",
            f"PhaseSpace:bias2SelectionRef = {generator.jet_pt_min}"]
    # Later lines override earlier ones: no pT-hat cap.
    pythia = start_pythia([*pythia_settings(class_name, generator, shard_seed(0, class_name, 0)), "PhaseSpace:pTHatMax = -1", *bias])
    columns = {"jet_pt": [], "pt_hat": [], "weight": []}
    for _ in range(0, n_events, generator.batch_events):
        events = pythia.nextBatch(generator.batch_events)
        jets = select_jets(events.prt, class_name, generator)
        jets_per_event = ak.to_numpy(ak.num(jets, axis=1))
        columns["jet_pt"].append(ak.to_numpy(ak.flatten(jets.pt)))
        columns["pt_hat"].append(np.repeat(np.sqrt(ak.to_numpy(events.info.pT2Hat)), jets_per_event))
        columns["weight"].append(np.repeat(ak.to_numpy(events.info.weights[:, 0]), jets_per_event))
    return {name: np.concatenate(values) for name, values in columns.items()}


def weighted_fraction(weight: np.ndarray, selected: np.ndarray) -> tuple[float, float]:
    """Weighted fraction of the jets that are ``selected``, and its standard error
    (sqrt(sum w^2 (1_selected - f)^2) / sum w, the binomial error for weighted events)."""
    fraction = weight[selected].sum() / weight.sum()
    error = np.sqrt(np.sum(weight**2 * (selected - fraction) ** 2)) / weight.sum()
    return float(fraction), float(error)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=20_000, help="events of each class's reference run")
    parser.add_argument("--jets", type=int, default=300, help="jets per class and floor in the timed runs")
    parser.add_argument("--classes", nargs="+", default=["g", "q", "t"])
    parser.add_argument("--floors", nargs="+", type=float, default=[0.9, 0.8, 0.7, 0.6], help="candidate floors, x jet_pt_min")
    args = parser.parse_args()
    generator = generator_config()
    window_bins = np.arange(generator.jet_pt_min, generator.jet_pt_max + 0.5 * BIN_WIDTH, BIN_WIDTH)
    cap = 1.2 * generator.jet_pt_max
    reported = [*range(LOW_BINS), len(window_bins) - 2]
    print(f"Fraction of each bin's jets that a run with the floor would not make (reference: floor {REFERENCE_FLOOR}, no cap)")
    print(f"| class | jet pT (GeV) | jets | effective jets | {' | '.join(f'pT-hat < {floor}' for floor in args.floors)} | pT-hat > {cap:.0f} GeV |")
    print("|---|---|---|---|" + "---|" * (len(args.floors) + 1))
    costs, reference_runs = {}, []
    for name in args.classes:
        start = time.perf_counter()
        reference = reference_jets(name, args.events)
        seconds = time.perf_counter() - start
        in_bin = np.digitize(reference["jet_pt"], window_bins) - 1
        rows = [(f"{window_bins[index]:.0f}-{window_bins[index + 1]:.0f}", in_bin == index) for index in reported]
        rows.append((f"all, {window_bins[0]:.0f}-{window_bins[-1]:.0f}", np.ones(len(in_bin), bool)))
        for label, jets in rows:
            weight, pt_hat = reference["weight"][jets], reference["pt_hat"][jets]
            cells = [weighted_fraction(weight, pt_hat < floor * generator.jet_pt_min) for floor in args.floors]
            cells.append(weighted_fraction(weight, pt_hat > cap))
            print(f"| {name} | {label} | {jets.sum()} | {weight.sum() ** 2 / np.sum(weight**2):.0f} | "
                  + " | ".join(f"{100 * f:.1f} ± {100 * e:.1f}%" for f, e in cells) + " |", flush=True)
        reference_runs.append(f"{name}: {args.events} reference events, {len(reference['jet_pt'])} jets in the window, {seconds:.0f} s")
        costs[name] = []
        for floor in args.floors:
            timed = generator_config(f"data.generator.pt_hat_min_fraction={floor}", f"data.generator.jets_per_shard={args.jets}")
            run = generate_shard(name, 0, 0, timed, progress=False)
            costs[name].append((floor, run["events"] / run["accepted"], run["accepted"] / run["seconds"]))
    print("\n".join(["", *reference_runs, ""]))
    print(f"The stage's speed with each floor ({args.jets} jets per run)")
    print(f"| class | floor (x jet_pt_min) | pT-hat floor (GeV) | events per jet | jets/s | time per jet / floor {args.floors[0]}'s |")
    print("|---|---|---|---|---|---|")
    for name, rows in costs.items():
        baseline = rows[0][2]
        for floor, events_per_jet, rate in rows:
            print(f"| {name} | {floor} | {floor * generator.jet_pt_min:.0f} | {events_per_jet:.2f} | {rate:.1f} | {baseline / rate:.1f} |")


if __name__ == "__main__":
    main()
