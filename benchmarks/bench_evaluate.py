"""Wall time of a full evaluation of 50 000 vs 50 000 jets, metric by metric, with the papers' settings.

    python benchmarks/bench_evaluate.py [--dataset pythia] [--jets 50000] [--emd-jobs 0]

The jets are real ones: rows drawn with replacement from a processed dataset's train split (the
"reference") and its test split (the "generated" side), so multiplicities and features are those
of the dataset (``data/processed/<dataset>``, made by ``snakemake --cores 2`` or
``python -m pipeline.preprocess``). Every metric runs as ``pipeline.evaluate`` runs it for one
comparison, with the default ``evaluate`` settings (W1 on 5 batches of 50 000 jets, FPD on batch
sizes 20 000 to 50 000, KPD on 10 batches of 5 000, coverage/MMD on 10 batches of 100), EFPs
computed once per side and shared. Prints a table; figures go in benchmarks/README.md.
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import numpy as np
from omegaconf import OmegaConf

from pipeline import metrics
from pipeline.config import EvaluateConfig
from pipeline.sets import read_sets


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", default="pythia")
    parser.add_argument("--jets", type=int, default=50_000)
    parser.add_argument("--emd-jobs", type=int, default=0)
    args = parser.parse_args()
    settings = OmegaConf.structured(EvaluateConfig)
    rng = np.random.default_rng(0)
    processed = Path("data/processed") / args.dataset
    sides = {}
    for side, split in (("reference", "train"), ("generated", "test")):
        sets = read_sets(processed / f"{split}.h5")
        rows = rng.integers(len(sets["labels"]), size=args.jets)
        sides[side] = (sets["particles"][rows], sets["mask"][rows])
    (real_particles, real_mask), (generated_particles, generated_mask) = sides["reference"], sides["generated"]
    print(f"# {time.strftime('%Y-%m-%d')}, {os.cpu_count()} CPU cores; {args.jets} vs {args.jets} jets of "
          f"data/processed/{args.dataset} (mean multiplicity {real_mask.sum(1).mean():.1f} of {real_mask.shape[1]})")
    print("| step | seconds |\n|---|---|")
    timings = {}

    def timed(name, function, *arguments, **keywords):
        start = time.perf_counter()
        result = function(*arguments, **keywords)
        timings[name] = time.perf_counter() - start
        print(f"| {name} | {timings[name]:.1f} |", flush=True)
        return result

    real_efps = timed("EFPs, reference (36, d <= 4)", metrics.energy_flow_polynomials, real_particles, real_mask)
    generated_efps = timed("EFPs, generated", metrics.energy_flow_polynomials, generated_particles, generated_mask)
    batches, n_jets = settings.w1_batches, settings.n_jets
    timed("w1m", metrics.w1m, real_particles, real_mask, generated_particles, generated_mask, batches, n_jets, rng)
    timed("w1p", metrics.w1p, real_particles, real_mask, generated_particles, generated_mask, batches, n_jets, rng)
    columns = metrics.w1efp_columns()
    timed("w1efp", metrics.w1efp, real_efps[:, columns], generated_efps[:, columns], batches, n_jets, rng)
    timed("fpd", metrics.fpd, real_efps, generated_efps, min_jets=settings.fpd_min_jets, max_jets=settings.fpd_max_jets,
          n_points=settings.fpd_points, n_batches=settings.fpd_batches, rng=rng)
    timed("kpd", metrics.kpd, real_efps, generated_efps, n_batches=settings.kpd_batches, n_per_batch=settings.kpd_jets, rng=rng)
    timed("cov, mmd", metrics.cov_mmd, real_particles, real_mask, generated_particles, generated_mask,
          n_per_batch=settings.cov_mmd_jets, n_batches=settings.cov_mmd_batches, rng=rng, n_jobs=args.emd_jobs)
    print(f"| **total** | **{sum(timings.values()):.1f}** |")


if __name__ == "__main__":
    main()
