"""Training throughput (jets/s) and model FLOP utilisation of the training stage's step.

    python benchmarks/bench_train.py [--rounds 3] [--steps 10] [--jets-per-class 2000] [--n-max 30 150]

Jets come from the real path: Pythia 8 + FastJet generates g/q/t jets (``pipeline.generate``),
``pipeline.preprocess`` pads them to 30 and to 150 particles, and batches come from
``pipeline.input_pipeline.TrainBatches`` in a background thread, as in ``pipeline.train``: at 150
particles without padding-aware cuts, with them, and with them on batches grouped by multiplicity
(``train.multiplicity_window=16``). The
model and batch are those of the ``jetnet30`` experiment (``model=base``, ``train.batch_size``).

Model FLOP utilisation (MFU) = (FLOPs of the steps run) / (their wall time), divided by the FLOP
rate of a large float32 matmul (``--matmul-size``, 2 n^3 FLOPs) measured in the same process on the
same devices. A shared VM's speed drifts by 20% and more within minutes, so each case runs in
rounds: time the matmul, then ``--steps`` steps, and take the ratio; the table gives the median and
the range over rounds. A step's FLOPs are XLA's own count for the compiled step (``cost_analysis()``) at the
batch's padded width, so padding-aware batches are credited only with the work they do. Steps run
after every width they use has been compiled. Prints a table; figures go in benchmarks/README.md.
XLA options apply as usual, e.g. ``XLA_FLAGS=--xla_cpu_experimental_ynn_fusion_type=`` (CPU dots
without YNNPACK fusions); the header prints them.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import threading
import time
from functools import partial
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from hydra import compose, initialize_config_dir

import pipeline
from pipeline.background import in_background
from pipeline.generate import generate_shard, shard_path, write_root
from pipeline.input_pipeline import TrainBatches
from pipeline.sets import read_sets
from pipeline.model import build_vdm
from pipeline.preprocess import preprocess
from pipeline.train import AXIS, replicate
from setdiff import create_train_state, make_optimizer, train_step


def matmul_flops_per_second(n: int, repeats: int = 5) -> float:
    """FLOP rate of an n x n float32 matmul on every local device at once (pmap)."""
    n_local = jax.local_device_count()
    a = replicate(np.random.default_rng(0).normal(size=(n, n)).astype(np.float32))
    multiply = jax.pmap(jnp.matmul)
    jax.block_until_ready(multiply(a, a))
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(multiply(a, a))
        times.append(time.perf_counter() - start)
    return n_local * 2 * n**3 / statistics.median(times)


def make_dataset(folder: Path, cfg_overrides: list[str], jets_per_class: int, n_max: int) -> Path:
    """Generated jets, preprocessed with ``data.n_max=n_max``; returns the processed folder."""
    with initialize_config_dir(str(Path(pipeline.__file__).parent / "conf"), version_base="1.3"):
        cfg = compose("config", overrides=[*cfg_overrides, f"data.raw_dir={folder / 'raw'}", f"data.n_max={n_max}",
                                           f"data.processed_dir={folder / f'processed_{n_max}'}",
                                           f"data.generator.jets_per_shard={jets_per_class}", "data.generator.n_shards=1"])
    for class_name in cfg.data.class_names:
        path = shard_path(cfg.data.raw_dir, class_name, 0)
        if not path.exists():
            jets = generate_shard(class_name, 0, cfg.seed, cfg.data.generator, progress=False)["jets"]
            path.parent.mkdir(parents=True, exist_ok=True)
            write_root(path, jets, class_name)
    processed = Path(cfg.data.processed_dir)
    if not (processed / "train.h5").exists():
        preprocess(cfg, processed, progress=False)
    return processed


def measure(processed: Path, cfg, padding_aware: bool, window: int, steps: int, rounds: int,
            matmul_size: int) -> dict:
    """Time ``rounds`` blocks of ``steps`` training steps, each right after timing the reference
    matmul; returns per-round jets/s, FLOP rates and MFUs, and the mean padded width."""
    n_local = jax.local_device_count()
    batches = TrainBatches(processed / "train.h5", processed / "normalisation.json", cfg.model.use_jet_context, cfg.model.log_pt_rel,
                           cfg.train.batch_size, cfg.seed, n_local, padding_aware=padding_aware, multiplicity_window=window,
                           window_jets=cfg.train.window_jets, context_pt_rel_sum=cfg.model.context_pt_rel_sum,
                           context_kept_mass=cfg.model.context_kept_mass)
    sets = read_sets(processed / "train.h5", datasets=())
    model = build_vdm(cfg.model, data_dim=len(sets["feature_names"]), n_classes=len(sets["class_names"]))
    optimizer = make_optimizer(cfg.train.learning_rate, cfg.train.steps, cfg.train.warmup_steps,
                               cfg.train.weight_decay, cfg.train.grad_clip)
    example = {name: array[0] for name, array in batches(0).items()}
    state = jax.device_get(create_train_state(model, jax.random.PRNGKey(0), example, optimizer))
    step_fn = partial(train_step, model=model, optimizer=optimizer, ema_decay=cfg.train.ema_decay, axis_name=AXIS)
    p_step = jax.pmap(step_fn, axis_name=AXIS, donate_argnums=(0,))
    rng = np.broadcast_to(np.asarray(jax.random.PRNGKey(1)), (n_local, 2))
    total_steps = rounds * steps
    widths = [batches(step)["x"].shape[2] for step in range(total_steps)]

    flops_per_width = {}
    replicated = replicate(state)
    for width in sorted(set(widths)):  # compile every width first; count its FLOPs (XLA's cost analysis)
        batch = next(batches(step) for step in range(total_steps) if widths[step] == width)
        replicated, _ = p_step(replicated, batch, rng)
        shard = {name: array[0] for name, array in batch.items()}
        compiled = jax.jit(partial(train_step, model=model, optimizer=optimizer, ema_decay=cfg.train.ema_decay)) \
            .lower(state, shard, rng[0]).compile()
        flops_per_width[width] = n_local * compiled.cost_analysis()["flops"]
    jax.block_until_ready(replicated)

    jets_per_s, flops_per_s, mfu = [], [], []
    for first in range(0, total_steps, steps):
        peak = matmul_flops_per_second(matmul_size)
        stop = threading.Event()
        start = time.perf_counter()
        for batch in in_background((batches(step) for step in range(first, first + steps)), stop):
            replicated, metrics = p_step(replicated, batch, rng)
        jax.block_until_ready(metrics)
        seconds = time.perf_counter() - start
        stop.set()
        jets_per_s.append(steps * cfg.train.batch_size / seconds)
        flops_per_s.append(sum(flops_per_width[width] for width in widths[first:first + steps]) / seconds)
        mfu.append(flops_per_s[-1] / peak)
    return {
        "jets_per_s": jets_per_s,
        "flops_per_s": flops_per_s,
        "mfu": mfu,
        "mean_width": float(np.mean(widths)),
        "flops_per_jet": float(np.mean([flops_per_width[w] for w in widths])) / cfg.train.batch_size,
    }


def spread(values: list[float], scale: float = 1.0, pattern: str = "{:.0f}") -> str:
    """Median and range of ``values`` (times ``scale``), e.g. ``"445 (430-511)"``."""
    low, middle, high = (pattern.format(scale * value) for value in (min(values), statistics.median(values), max(values)))
    return middle if len(values) == 1 else f"{middle} ({low}-{high})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=10, help="timed training steps per round")
    parser.add_argument("--rounds", type=int, default=3, help="rounds per case, each timing the matmul and then the steps")
    parser.add_argument("--jets-per-class", type=int, default=2000, help="generated g, q and t jets each")
    parser.add_argument("--matmul-size", type=int, default=4096, help="n of the n x n reference matmul")
    parser.add_argument("--experiment", default="jetnet30", help="experiment preset whose model and batch are timed")
    parser.add_argument("--n-max", type=int, nargs="+", choices=(30, 150), default=[30, 150],
                        help="particle counts to time (150: without and with padding-aware cuts and grouping)")
    args = parser.parse_args()
    overrides = [f"experiment={args.experiment}", "data=pythia"]
    with initialize_config_dir(str(Path(pipeline.__file__).parent / "conf"), version_base="1.3"):
        cfg = compose("config", overrides=overrides)
    print(f"devices: {jax.local_device_count()} x {jax.devices()[0].device_kind}; model d_model={cfg.model.d_model} "
          f"n_layers={cfg.model.n_layers} n_heads={cfg.model.n_heads}; global batch {cfg.train.batch_size}")
    print(f"XLA_FLAGS: {os.environ.get('XLA_FLAGS', '(unset)')}")
    print(f"reference: float32 matmul {args.matmul_size}^2 before each round of {args.steps} steps; "
          f"median (range) of {args.rounds} rounds\n")
    print("| n_max | padding-aware | multiplicity window | mean width | GFLOP/jet | jets/s | GFLOP/s | MFU |")
    print("|---|---|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as folder:
        cases = ((30, True, 0), (150, False, 0), (150, True, 0), (150, True, 16))
        for n_max, padding_aware, window in (case for case in cases if case[0] in args.n_max):
            processed = make_dataset(Path(folder), overrides, args.jets_per_class, n_max)
            result = measure(processed, cfg, padding_aware, window, args.steps, args.rounds, args.matmul_size)
            print(f"| {n_max} | {'yes' if padding_aware else 'no'} | {window or '-'} | {result['mean_width']:.0f} | "
                  f"{result['flops_per_jet'] / 1e9:.3f} | {spread(result['jets_per_s'])} | "
                  f"{spread(result['flops_per_s'], 1e-9)} | {spread(result['mfu'], 100, '{:.0f}%')} |", flush=True)


if __name__ == "__main__":
    main()
