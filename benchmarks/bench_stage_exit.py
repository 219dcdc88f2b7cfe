"""What a stage process spends on Python's exit, with and without ``pipeline.stage``'s frozen heap.

    python benchmarks/bench_stage_exit.py [--rounds 5] [--steps 30]

A tiny training run (``pipeline.train``, a 16-wide one-layer model, ``--steps`` steps of 8 jets on
a synthetic dataset of 400 jets) in a fresh process, ``--rounds`` times each way, the two ways
alternating: as the stage runs (``gc.freeze()`` registered as an exit handler by
``pipeline.stage.exit_without_a_final_collection``), and with that function replaced by one that
does nothing. The process prints the time when its other exit handlers are done (a handler
registered before any other runs last); the exit's remainder is the time from then to the end of
the process as this script sees it, which is the interpreter tearing its modules down. A first,
untimed run fills a JAX compilation cache of the script's own, so no timed run compiles. Printed:
the median (range) of the whole process and of that remainder. Figures go in benchmarks/README.md.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench_input import write_dataset

PROJECT_ROOT = Path(__file__).resolve().parents[1]

RUN_STAGE = """
import atexit, runpy, sys, time
atexit.register(lambda: print(f"exit handlers done at {{time.time()!r}}", flush=True))  # first in, last out
import pipeline.stage
if {without}:
    pipeline.stage.exit_without_a_final_collection = lambda: None
sys.argv = ["pipeline.train", *{overrides!r}]
runpy.run_module("pipeline.train", run_name="__main__", alter_sys=True)  # as `python -m pipeline.train`
"""


def run_training(folder: Path, results: Path, steps: int, without: bool) -> tuple[float, float]:
    """One training process: its wall time and the time after its exit handlers, in seconds."""
    overrides = [f"results_dir={results}", f"data.processed_dir={folder}", "model.d_model=16", "model.n_layers=1",
                 "model.n_heads=2", f"train.steps={steps}", "train.batch_size=8", "train.warmup_steps=5",
                 f"train.log_every={steps}", "train.val_jets=16"]
    environment = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{folder / 'mlflow.db'}",
                   "JAX_COMPILATION_CACHE_DIR": str(folder / "jax-cache"), "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0"}
    start = time.time()
    result = subprocess.run([sys.executable, "-c", RUN_STAGE.format(without=without, overrides=overrides)],
                            cwd=PROJECT_ROOT, env=environment, capture_output=True, text=True)
    end = time.time()
    if result.returncode != 0:
        raise SystemExit(f"the training process failed:\n{result.stderr[-2000:]}")
    handlers_done = float(result.stdout.strip().splitlines()[-1].split()[-1])
    return end - start, end - handlers_done


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=30)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as temporary:
        folder = Path(temporary)
        write_dataset(folder, 400, n_max=30)
        run_training(folder, folder / "warm-up", args.steps, without=False)  # fills the compilation cache
        timings = {"frozen heap (the stage's)": [], "without": []}
        for round_ in range(args.rounds):
            for index, (way, seconds) in enumerate(timings.items()):
                seconds.append(run_training(folder, folder / f"run-{round_}-{index}", args.steps, without=way == "without"))
    print("| exit | runs | process s | after the exit handlers s |")
    print("|---|---|---|---|")
    for way, seconds in timings.items():
        cells = []
        for column in zip(*seconds):
            cells.append(f"{statistics.median(column):.2f} ({min(column):.2f}-{max(column):.2f})")
        print(f"| {way} | {len(seconds)} | {' | '.join(cells)} |")


if __name__ == "__main__":
    main()
