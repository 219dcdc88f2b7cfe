"""Sampling speed and quality: jets/s of each sampler at 25, 50, 100 and 200 steps, with W1M beside each.

    python benchmarks/bench_sample.py [--experiment demo] [--jets-per-class 500] [--steps 25 50 100 200] [--overrides ...]

Uses the experiment's trained model and processed data as the stages do (run ``snakemake --cores 2``
or ``python -m pipeline.train experiment=demo`` first). For every sampler and step count the
sampling stage's own ``pipeline.sample.generate`` runs twice in this process: the first call
compiles, the second is timed. Quality is W1 of the relative jet mass against the test split
(``pipeline.metrics.w1m``, 5 batches of as many jets as were generated); the last line is the
train split against the test split, the floor that sample size allows. The aim: the
quality of 200 ancestral steps in at most 25 steps. Prints a table; figures go in benchmarks/README.md.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import jax
import numpy as np
from hydra import compose, initialize_config_dir

import pipeline
from pipeline.metrics import w1m
from pipeline.sample import generate
from pipeline.sets import read_sets

SAMPLERS = ("ancestral", "ddim", "heun")


def network_calls(sampler: str, steps: int) -> int:
    return 2 * steps - 1 if sampler == "heun" else steps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--experiment", default="demo")
    parser.add_argument("--jets-per-class", type=int, default=500)
    parser.add_argument("--steps", type=int, nargs="+", default=[25, 50, 100, 200])
    parser.add_argument("--overrides", nargs="*", default=[], help="Hydra overrides, e.g. results_dir=results/demo_long")
    args = parser.parse_args()

    with initialize_config_dir(str(Path(pipeline.__file__).parent / "conf"), version_base="1.3"):
        base = compose("config", overrides=[f"experiment={args.experiment}", *args.overrides, f"sample.n_jets={args.jets_per_class}"])
    test = read_sets(Path(base.data.processed_dir) / "test.h5")
    n_jets = args.jets_per_class * len(test["class_names"])

    def quality(sets) -> tuple[float, float]:
        return w1m(test["particles"], test["mask"], sets["particles"], sets["mask"], 5, n_jets, np.random.default_rng(0))

    print(f"# {time.strftime('%Y-%m-%d')}, {os.cpu_count()} CPU cores, jax {jax.__version__} on {jax.devices()[0].platform}, "
          f"{jax.local_device_count()} device(s); experiment {args.experiment} {' '.join(args.overrides)}, {n_jets} jets per run")
    print("| sampler | steps | network calls | jets/s | W1M ×10³ |\n|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as folder:
        for sampler in SAMPLERS:
            for steps in args.steps:
                with initialize_config_dir(str(Path(pipeline.__file__).parent / "conf"), version_base="1.3"):
                    cfg = compose("config", overrides=[f"experiment={args.experiment}", *args.overrides, f"sample.n_jets={args.jets_per_class}",
                                                       f"sample.sampler={sampler}", f"sample.steps={steps}"])
                path = Path(folder) / f"{sampler}_{steps}.h5"
                generate(cfg, path, progress=False)  # compiles
                figures = generate(cfg, path, progress=False)
                mean, std = quality(read_sets(path))
                print(f"| {sampler} | {steps} | {network_calls(sampler, steps)} | {figures['jets_per_s']:.0f} | "
                      f"{1e3 * mean:.2f} ± {1e3 * std:.2f} |", flush=True)
    mean, std = quality(read_sets(Path(base.data.processed_dir) / "train.h5"))
    print(f"| train split (truth) | | | | {1e3 * mean:.2f} ± {1e3 * std:.2f} |")


if __name__ == "__main__":
    main()
