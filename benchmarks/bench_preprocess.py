"""Preprocessing throughput against reading the same branches with uproot alone (target: >= 70%).

    python benchmarks/bench_preprocess.py [--jets 300000] [--particles 50]

Writes one JetClass-style ROOT file per class (float32 ``part_*`` branches, ``label_*``) with a
Poisson number of particles per jet, then, in one run, times (a) ``uproot`` reading the four momentum
branches and the label branches of every file in the preprocess stage's chunks and (b) the whole
``pipeline.preprocess.preprocess`` (reading, conversion, sorting, padding, splitting, compressed
HDF5 output, checksums), on the same files. Prints a table; figures go in benchmarks/README.md.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import awkward as ak
import numpy as np
import uproot
from hydra import compose, initialize_config_dir

import pipeline

from pipeline.preprocess import chunk_plan, preprocess
from pipeline.readers import RootReader

CLASSES = ["g", "q", "t"]
JETS_PER_BASKET = 10_000


def write_jets(path: Path, n_jets: int, mean_particles: int, class_name: str, rng: np.random.Generator,
               shuffled: bool = False) -> None:
    counts = rng.poisson(mean_particles, n_jets) + 1
    n = counts.sum()
    pt = rng.exponential(20.0, n)
    if not shuffled:  # hardest first within each jet, as in JetClass and pipeline.generate output
        jet_of_particle = np.repeat(np.arange(n_jets), counts)
        pt = pt[np.lexsort((-pt, jet_of_particle))]
    eta = rng.normal(0.0, 0.2, n) + np.repeat(rng.uniform(-2, 2, n_jets), counts)
    phi = rng.normal(0.0, 0.2, n) + np.repeat(rng.uniform(-np.pi, np.pi, n_jets), counts)
    px, py, pz = pt * np.cos(phi), pt * np.sin(phi), pt * np.sinh(eta)
    energy = np.sqrt(px**2 + py**2 + pz**2)
    part = ak.zip({name: ak.unflatten(values.astype(np.float32), counts)
                   for name, values in {"px": px, "py": py, "pz": pz, "energy": energy}.items()})
    branches = {"part": part, **{f"label_{name}": np.full(n_jets, name == class_name) for name in CLASSES}}
    with uproot.recreate(path) as file:
        file.mktree("tree", {name: array.type if isinstance(array, ak.Array) else array.dtype for name, array in branches.items()})
        for start in range(0, n_jets, JETS_PER_BASKET):  # many baskets, as real files have
            file["tree"].extend({name: array[start : start + JETS_PER_BASKET] for name, array in branches.items()})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jets", type=int, default=300_000, help="jets in all (split evenly over the classes)")
    parser.add_argument("--particles", type=int, default=50, help="mean particles per jet")
    parser.add_argument("--chunk-jets", type=int, default=50_000, help="data.chunk_jets (the default)")
    parser.add_argument("--shuffled", action="store_true", help="particles in random order within jets (so the stage sorts them)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder, initialize_config_dir(str(Path(pipeline.__file__).parent / "conf"), version_base="1.3"):
        raw_dir, processed_dir = Path(folder) / "raw", Path(folder) / "processed"
        raw_dir.mkdir()
        rng = np.random.default_rng(0)
        for name in CLASSES:
            write_jets(raw_dir / f"{name}_000.root", args.jets // len(CLASSES), args.particles, name, rng, args.shuffled)
        cfg = compose("config", overrides=[
            f"data.raw_dir={raw_dir}", f"data.processed_dir={processed_dir}", "data.generator.n_shards=1",
            f"data.chunk_jets={args.chunk_jets}",
        ])
        paths = sorted(raw_dir.glob("*.root"))
        reader = RootReader(cfg.data)
        branches = [*reader.momenta, *reader.label_branches]
        megabytes = sum(path.stat().st_size for path in paths) / 1e6

        start = time.perf_counter()
        for chunk in chunk_plan(reader, paths, args.chunk_jets):
            for path, first, last in chunk:
                with uproot.open(path) as file:
                    file["tree"].arrays(branches, entry_start=first, entry_stop=last)
        uproot_seconds = time.perf_counter() - start

        counts = preprocess(cfg, processed_dir, progress=False)[0]
        output_megabytes = sum(path.stat().st_size for path in processed_dir.glob("*.h5")) / 1e6

    rate_uproot = args.jets / uproot_seconds
    rate_preprocess = counts["jets_read"] / counts["seconds"]
    order = "random order" if args.shuffled else "hardest first"
    print(f"{args.jets} jets, {args.particles} particles/jet on average ({order}), {megabytes:.0f} MB of ROOT in, "
          f"{output_megabytes:.0f} MB of HDF5 out (n_max 30)")
    print("| what | seconds | jets/s |")
    print("|---|---|---|")
    print(f"| uproot alone: read the branches | {uproot_seconds:.2f} | {rate_uproot:,.0f} |")
    print(f"| pipeline.preprocess (whole stage) | {counts['seconds']:.2f} | {rate_preprocess:,.0f} |")
    print(f"| ratio | | {rate_preprocess / rate_uproot:.0%} |")


if __name__ == "__main__":
    main()
