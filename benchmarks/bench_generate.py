"""Generation throughput against Pythia alone (target: the stage reaches >= 75% of Pythia's rate).

    python benchmarks/bench_generate.py [--jets 300] [--classes g q t]

For each class, in one run: ``pipeline.generate.generate_shard`` makes ``--jets`` jets (Pythia
events in batches, visible final state, FastJet clustering, truth matching, selection), then
Pythia alone, with the same settings and seed, generates the same number of events with
``pythia.next()`` and nothing extracted or clustered. Prints a table; figures go in
benchmarks/README.md.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from hydra import compose, initialize_config_dir

import pipeline
from pipeline.generate import generate_shard, pythia_settings, shard_seed, start_pythia


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jets", type=int, default=300, help="jets per class made by the stage")
    parser.add_argument("--classes", nargs="+", default=["g", "q", "t", "w", "z"])
    args = parser.parse_args()
    with initialize_config_dir(str(Path(pipeline.__file__).parent / "conf"), version_base="1.3"):
        generator = compose("config", overrides=[f"data.generator.jets_per_shard={args.jets}"]).data.generator
    print("| class | events | stage events/s | Pythia alone events/s | ratio | jets per event |")
    print("|---|---|---|---|---|---|")
    for name in args.classes:
        stage = generate_shard(name, 0, 0, generator, progress=False)
        pythia = start_pythia(pythia_settings(name, generator, shard_seed(0, name, 0)))
        start = time.perf_counter()
        for _ in range(stage["events"]):
            pythia.next()
        alone_seconds = time.perf_counter() - start
        stage_rate, alone_rate = stage["events"] / stage["seconds"], stage["events"] / alone_seconds
        print(f"| {name} | {stage['events']} | {stage_rate:.1f} | {alone_rate:.1f} | {stage_rate / alone_rate:.0%} | "
              f"{stage['accepted'] / stage['events']:.2f} |")


if __name__ == "__main__":
    main()
