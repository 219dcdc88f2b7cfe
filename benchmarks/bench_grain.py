"""Grain against the pipeline's own windowed reader, on the same sets file.

    pip install grain   # not a dependency of the pipeline
    python benchmarks/bench_grain.py [--jets 1000000] [--n-max 30] [--batch-size 256] [--batches 200]

Grain (google/grain) is the JAX ecosystem's data loader: a ``MapDataset`` over a random-access
source, shuffled with a seed and batched, gives batch ``i`` as a pure function of the seed and
``i`` (deterministic, resumable) and shards by process. Over a sets file its source reads one jet
per index from HDF5, as h5py reads a row: the chunk that holds it is decompressed (1 024 jets, LZF)
unless it is in h5py's chunk cache. A global shuffle asks for jets from all over the file, so
nearly every jet costs a chunk.

The same synthetic train split (``bench_input.write_dataset``) is read, each reader in a fresh
process: ``pipeline.input_pipeline.TrainBatches`` (windows of ``train.window_jets`` jets shuffled
in memory) and Grain's ``MapDataset.source(...).shuffle(seed).batch(...)`` with h5py's default
chunk cache (1 MiB per dataset) and with a cache that holds the whole file. Printed: jets/s
delivered (one thread, as the trainer's background thread runs the input) and peak resident memory
(``VmHWM``). Figures go in benchmarks/README.md.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import h5py
import numpy as np

from bench_input import peak_resident_gb, write_dataset


class SetsFileSource:
    """Grain's random-access source over a sets file's train split: jet ``i``'s particles and mask."""

    def __init__(self, path: Path, cache_bytes: int | None):
        options = {} if cache_bytes is None else {"rdcc_nbytes": cache_bytes, "rdcc_nslots": 1_000_003}
        self.file = h5py.File(path, "r", **options)
        self.particles, self.mask = self.file["particles"], self.file["mask"]

    def __len__(self) -> int:
        return len(self.mask)

    def __getitem__(self, index: int) -> dict[str, np.ndarray]:
        return {"x": self.particles[index], "mask": self.mask[index]}


def measure_grain(folder: Path, batch_size: int, batches: int, whole_file_cache: bool) -> dict:
    import grain.python as grain

    path = folder / "train.h5"
    cache = path.stat().st_size * 4 if whole_file_cache else None  # decompressed chunks take more room than the file
    dataset = grain.MapDataset.source(SetsFileSource(path, cache)).shuffle(seed=0).batch(batch_size, drop_remainder=True)
    start = time.perf_counter()
    for step in range(batches):
        dataset[step]
    seconds = time.perf_counter() - start
    return {"jets_per_s": batches * batch_size / seconds, "peak_rss_gb": peak_resident_gb()}


def measure_windows(folder: Path, batch_size: int, batches: int) -> dict:
    from pipeline.input_pipeline import TrainBatches

    reader = TrainBatches(folder / "train.h5", folder / "normalisation.json", False, False, batch_size, seed=0, n_local_devices=1)
    start = time.perf_counter()
    for step in range(batches):
        reader(step)
    seconds = time.perf_counter() - start
    return {"jets_per_s": batches * batch_size / seconds, "peak_rss_gb": peak_resident_gb()}


READERS = {
    "windows (pipeline)": lambda folder, args: measure_windows(folder, args.batch_size, args.window_batches),
    "Grain, default chunk cache": lambda folder, args: measure_grain(folder, args.batch_size, args.batches, False),
    "Grain, whole-file chunk cache": lambda folder, args: measure_grain(folder, args.batch_size, args.batches, True),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jets", type=int, default=1_000_000)
    parser.add_argument("--n-max", type=int, default=30)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--batches", type=int, default=200, help="batches Grain draws")
    parser.add_argument("--window-batches", type=int, default=3_000, help="batches the windowed reader draws (several windows)")
    parser.add_argument("--measure", nargs=2, help=argparse.SUPPRESS)  # internal: the reader and the folder, in this process
    args = parser.parse_args()
    if args.measure:
        reader, folder = args.measure
        print(json.dumps(READERS[reader](Path(folder), args)))
        return

    print(f"{args.jets:,} jets x {args.n_max}, batch {args.batch_size}")
    print("| reader | batches drawn | jets/s | peak RSS GB |")
    print("|---|---|---|---|")
    with tempfile.TemporaryDirectory(prefix="bench-grain-") as folder:
        write_dataset(Path(folder), args.jets, args.n_max)
        for reader in READERS:
            result = subprocess.run([sys.executable, __file__, *sys.argv[1:], "--measure", reader, folder],
                                    capture_output=True, text=True, check=True)
            figures = json.loads(result.stdout.strip().splitlines()[-1])
            drawn = args.window_batches if reader.startswith("windows") else args.batches
            print(f"| {reader} | {drawn} | {figures['jets_per_s']:,.0f} | {figures['peak_rss_gb']:.2f} |", flush=True)


if __name__ == "__main__":
    main()
