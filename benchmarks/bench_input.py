"""The training input's memory and speed against the size of the dataset.

    python benchmarks/bench_input.py [--jets 10000000 1000000] [--n-max 30] [--batch-size 256] [--steps 300]

For each size, a synthetic processed dataset (``train.h5`` in the sets layout of ``pipeline.sets``,
multiplicities uniform in 5..n_max, and its ``normalisation.json``) is written to a temporary
folder, and a fresh Python process builds the training input exactly as ``pipeline.train`` does
(``SetsSplit`` of the train split, then ``TrainBatches``) and draws ``--steps`` batches of
``--batch-size`` jets, cut to their padding. Printed per size: the dataset's bytes as float32 sets,
seconds to load it, jets/s delivered, and the process's peak resident memory (``VmHWM``, which
includes Python, numpy and h5py). Jets/s is single-threaded, as the trainer's background
thread runs it; compare it with the training step's consumption (``bench_setdiff.py``,
``bench_train.py``). Figures go in benchmarks/README.md.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from pipeline.config import PARTICLE_FEATURES
from pipeline.sets import write_sets

WRITE_JETS = 100_000  # jets generated and appended at a time


def write_dataset(folder: Path, n_jets: int, n_max: int, seed: int = 0) -> None:
    """``train.h5`` of ``n_jets`` random jets and a ``normalisation.json`` of unit statistics."""
    rng = np.random.default_rng(seed)
    with write_sets(folder / "train.h5", n_max=n_max, feature_names=PARTICLE_FEATURES, jet_feature_names=["pt"],
                    class_names=["g", "t"], source="bench_input", config="") as writer:
        for start in range(0, n_jets, WRITE_JETS):
            count = min(WRITE_JETS, n_jets - start)
            multiplicity = rng.integers(5, n_max + 1, count)
            mask = np.arange(n_max) < multiplicity[:, None]
            particles = (rng.normal(size=(count, n_max, 3)) * mask[..., None]).astype(np.float32)
            writer.append(particles, mask, rng.normal(size=(count, 1)).astype(np.float32), rng.integers(0, 2, count).astype(np.int32))
    unit = {name: {"mean": 0.0, "std": 1.0} for name in PARTICLE_FEATURES}
    (folder / "normalisation.json").write_text(json.dumps({"particles": unit, "log_particles": unit, "jets": {"pt": {"mean": 0.0, "std": 1.0}}}))


def measure(folder: Path, batch_size: int, steps: int) -> dict:
    """Load the train split as training does and draw ``steps`` batches (run in a fresh process)."""
    from pipeline.input_pipeline import SetsSplit, TrainBatches

    start = time.perf_counter()
    split = SetsSplit(folder / "train.h5", folder / "normalisation.json", use_context=False)
    batches = TrainBatches(split, batch_size, seed=0, n_local_devices=1)
    load_seconds = time.perf_counter() - start
    batches(0)  # the first epoch's permutation
    start = time.perf_counter()
    for step in range(1, steps + 1):
        batches(step)
    draw_seconds = time.perf_counter() - start
    return {"load_s": load_seconds, "jets_per_s": steps * batch_size / draw_seconds, "peak_rss_gb": peak_resident_gb()}


def peak_resident_gb() -> float:
    """This process's peak resident memory (``VmHWM``). Not ``ru_maxrss``, which Linux carries over
    from the parent across fork and exec, so it would count the writer's memory too."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024 / 1e9
    raise RuntimeError("/proc/self/status has no VmHWM line; this benchmark needs Linux")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jets", type=int, nargs="+", default=[10_000_000, 1_000_000])
    parser.add_argument("--n-max", type=int, default=30)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--measure", help=argparse.SUPPRESS)  # internal: the folder to measure, in this process
    args = parser.parse_args()
    if args.measure:
        print(json.dumps(measure(Path(args.measure), args.batch_size, args.steps)))
        return

    print(f"n_max {args.n_max}, batch {args.batch_size}, {args.steps} batches, in-memory input (SetsSplit + TrainBatches)")
    print("| jets | float32 sets GB | write s | load s | jets/s delivered | peak RSS GB |")
    print("|---|---|---|---|---|---|")
    for n_jets in args.jets:
        with tempfile.TemporaryDirectory(prefix="bench-input-") as folder:
            start = time.perf_counter()
            write_dataset(Path(folder), n_jets, args.n_max)
            write_seconds = time.perf_counter() - start
            result = subprocess.run(
                [sys.executable, __file__, "--measure", folder, "--batch-size", str(args.batch_size), "--steps", str(args.steps)],
                capture_output=True, text=True, check=True,
            )
            figures = json.loads(result.stdout.strip().splitlines()[-1])
            sets_gb = n_jets * args.n_max * (3 * 4 + 1) / 1e9  # particles and mask
            print(f"| {n_jets:,} | {sets_gb:.2f} | {write_seconds:.0f} | {figures['load_s']:.1f} | "
                  f"{figures['jets_per_s']:,.0f} | {figures['peak_rss_gb']:.2f} |", flush=True)


if __name__ == "__main__":
    main()
