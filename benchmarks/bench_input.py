"""The training input's memory and speed against the size of the dataset.

    python benchmarks/bench_input.py [--jets 10000000 1000000] [--n-max 30] [--batch-size 256] [--steps 3000]
                                     [--train-steps 100] [--shards 1] [--window-jets 262144]

For each size, a synthetic processed dataset (``train.h5`` in the sets layout of ``pipeline.sets``,
multiplicities uniform in 5..n_max, a ``val.h5`` of 2 048 jets and their ``normalisation.json``) is
written to a temporary folder; with ``--shards K`` the train split is written as K shard files that
``train.h5`` joins, as ``pipeline.preprocess`` writes it with ``data.preprocess_shards=K``. Then,
each in a fresh Python process:

- the input alone: ``TrainBatches`` as ``pipeline.train`` builds it (``train.window_jets`` at its
  default) draws ``--steps`` batches of ``--batch-size`` jets, cut to their padding;
- a short training run (``pipeline.train.train``, the demo's small model, ``--train-steps`` steps).

Printed per size: the dataset's bytes as float32 sets, seconds to write it and to open it (reading
the multiplicities), jets/s the input delivers, the training run's seconds (compilation included;
the training step's own rate is ``bench_train.py``'s), and the peak resident memory of each process (``VmHWM``, which includes Python, numpy, h5py and, for the
training run, JAX and the model). Jets/s of the input is single-threaded, as the trainer's
background thread runs it. Figures go in benchmarks/README.md.
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

from pipeline.config import PARTICLE_FEATURES, SHARDS_FOLDER, TrainConfig, processed_shard_stem
from pipeline.sets import write_joined_sets, write_sets

WRITE_JETS = 100_000  # jets generated and appended at a time


def write_split(path: Path, n_jets: int, n_max: int, rng: np.random.Generator) -> None:
    """A sets file of ``n_jets`` random jets."""
    with write_sets(path, n_max=n_max, feature_names=PARTICLE_FEATURES, jet_feature_names=["pt"],
                    class_names=["g", "t"], source="bench_input", config="") as writer:
        for start in range(0, n_jets, WRITE_JETS):
            count = min(WRITE_JETS, n_jets - start)
            multiplicity = rng.integers(5, n_max + 1, count)
            mask = np.arange(n_max) < multiplicity[:, None]
            particles = rng.normal(size=(count, n_max, 3))
            particles[..., 2] = np.exp(particles[..., 2])  # pt_rel > 0, its logarithm of unit statistics
            particles = (particles * mask[..., None]).astype(np.float32)
            writer.append(particles, mask, rng.normal(size=(count, 1)).astype(np.float32), rng.integers(0, 2, count).astype(np.int32))


def write_dataset(folder: Path, n_jets: int, n_max: int, n_shards: int = 1, seed: int = 0) -> None:
    """``train.h5`` of ``n_jets`` random jets (joining ``n_shards`` shards, if more than 1), ``val.h5``
    of 2 048 and a ``normalisation.json`` of unit statistics."""
    rng = np.random.default_rng(seed)
    if n_shards == 1:
        write_split(folder / "train.h5", n_jets, n_max, rng)
    else:
        (folder / SHARDS_FOLDER).mkdir()
        shards = [folder / SHARDS_FOLDER / f"train-{processed_shard_stem(shard, n_shards)}.h5" for shard in range(n_shards)]
        for shard, path in enumerate(shards):
            write_split(path, (shard + 1) * n_jets // n_shards - shard * n_jets // n_shards, n_max, rng)
        with write_joined_sets(folder / "train.h5", shards):
            pass
    write_split(folder / "val.h5", 2_048, n_max, rng)
    unit = {name: {"mean": 0.0, "std": 1.0} for name in PARTICLE_FEATURES}
    (folder / "normalisation.json").write_text(json.dumps({
        "particles": unit, "log_particles": unit, "jets": {"pt": {"mean": 0.0, "std": 1.0}},
        "n_train_particles": n_jets * (5 + n_max) // 2, "n_train_jets": n_jets,
    }))


def measure_input(folder: Path, batch_size: int, steps: int, window_jets: int) -> dict:
    """Open the train split as training does and draw ``steps`` batches (run in a fresh process)."""
    from pipeline.input_pipeline import TrainBatches

    start = time.perf_counter()
    batches = TrainBatches(folder / "train.h5", folder / "normalisation.json", False, False, batch_size, seed=0, n_local_devices=1,
                           window_jets=window_jets)
    open_seconds = time.perf_counter() - start
    start = time.perf_counter()
    for step in range(steps):
        batches(step)
    draw_seconds = time.perf_counter() - start
    return {"open_s": open_seconds, "jets_per_s": steps * batch_size / draw_seconds, "peak_rss_gb": peak_resident_gb()}


def measure_training(folder: Path, batch_size: int, steps: int, window_jets: int) -> dict:
    """A short training run of the demo's small model on the dataset (run in a fresh process)."""
    from hydra import compose, initialize_config_dir

    import pipeline.config  # noqa: F401  (registers the config schema)
    from pipeline.train import train

    with initialize_config_dir(str(Path(pipeline.config.__file__).parent / "conf"), version_base="1.3"):
        cfg = compose("config", overrides=[
            "model=small", f"data.processed_dir={folder}", f"train.steps={steps}", f"train.batch_size={batch_size}",
            "train.warmup_steps=10", f"train.val_every={steps}", f"train.checkpoint_every={steps}", "train.val_jets=256",
            f"train.window_jets={window_jets}",
        ])
    with tempfile.TemporaryDirectory(prefix="bench-input-train-") as output:
        start = time.perf_counter()
        train(cfg, Path(output), primary=False, progress=False)
        seconds = time.perf_counter() - start
    return {"train_s": seconds, "train_peak_rss_gb": peak_resident_gb()}


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
    parser.add_argument("--steps", type=int, default=3000)
    parser.add_argument("--train-steps", type=int, default=100)
    parser.add_argument("--shards", type=int, default=1, help="write the train split as this many shards, joined")
    parser.add_argument("--window-jets", type=int, default=TrainConfig.window_jets, help="train.window_jets: jets read at a time")
    parser.add_argument("--measure", nargs=2, help=argparse.SUPPRESS)  # internal: what to measure, and the folder
    args = parser.parse_args()
    if args.measure:
        what, folder = args.measure
        measure = measure_input if what == "input" else measure_training
        print(json.dumps(measure(Path(folder), args.batch_size, args.steps if what == "input" else args.train_steps, args.window_jets)))
        return

    print(f"n_max {args.n_max}, batch {args.batch_size}, train split in {args.shards} shard(s), windows of {args.window_jets} jets; "
          f"input: {args.steps} batches; "
          f"training: {args.train_steps} steps, small model")
    print("| jets | float32 sets GB | write s | open s | input jets/s | input peak RSS GB | training s | training peak RSS GB |")
    print("|---|---|---|---|---|---|---|---|")
    for n_jets in args.jets:
        with tempfile.TemporaryDirectory(prefix="bench-input-") as folder:
            start = time.perf_counter()
            write_dataset(Path(folder), n_jets, args.n_max, args.shards)
            write_seconds = time.perf_counter() - start
            figures = {}
            for what in ("input", "training"):
                result = subprocess.run(
                    [sys.executable, __file__, "--measure", what, folder, "--batch-size", str(args.batch_size),
                     "--steps", str(args.steps), "--train-steps", str(args.train_steps), "--window-jets", str(args.window_jets)],
                    capture_output=True, text=True, check=True,
                )
                figures.update(json.loads(result.stdout.strip().splitlines()[-1]))
            sets_gb = n_jets * args.n_max * (3 * 4 + 1) / 1e9  # particles and mask
            print(f"| {n_jets:,} | {sets_gb:.2f} | {write_seconds:.0f} | {figures['open_s']:.1f} | {figures['jets_per_s']:,.0f} | "
                  f"{figures['peak_rss_gb']:.2f} | {figures['train_s']:.0f} | {figures['train_peak_rss_gb']:.2f} |", flush=True)


if __name__ == "__main__":
    main()
