"""Throughput of the setdiff model on this machine: training steps and sampling, in sets per second.

    python benchmarks/bench_setdiff.py [--batch 64] [--repeats 5]

Jet-like sets (3 features, all elements real) at 30 and 150 elements, the `small` and `base` models
of the pipeline's config (``model=small``, ``model=base``), full masked self-attention versus ISAB with 16 inducing points. Times exclude compilation
(one warm-up call first) and are the median of ``--repeats`` timed calls.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from hydra import compose, initialize_config_dir

import pipeline
from pipeline.model import build_vdm
from setdiff import create_train_state, make_optimizer, sample, train_step


def median_seconds(fn, repeats: int, min_seconds: float = 1.0) -> float:
    """Median time of one call after a compiling call: at least ``repeats`` calls and ``min_seconds``
    in all, so that cases of a few milliseconds are not timed from a handful of noisy calls."""
    jax.block_until_ready(fn())  # compile
    times = []
    while len(times) < repeats or sum(times) < min_seconds:
        start = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def measure(model_name: str, n_max: int, n_inducing: int, batch: int, repeats: int) -> dict:
    with initialize_config_dir(str(Path(pipeline.__file__).parent / "conf"), version_base="1.3"):
        model_config = compose("config", overrides=[f"model={model_name}", f"model.n_inducing={n_inducing}"]).model
    model = build_vdm(model_config, data_dim=3, n_classes=3)
    rng = np.random.default_rng(0)
    data = {
        "x": jnp.asarray(rng.normal(size=(batch, n_max, 3)), jnp.float32),
        "mask": jnp.ones((batch, n_max), bool),
        "labels": jnp.asarray(rng.integers(0, 3, batch), jnp.int32),
    }
    optimizer = make_optimizer(1e-3, 1000)
    state = create_train_state(model, jax.random.key(0), data, optimizer)
    step = jax.jit(lambda s, b: train_step(s, b, jax.random.key(1), model=model, optimizer=optimizer)[0])
    train_seconds = median_seconds(lambda: step(state, data), repeats)
    sample_seconds = median_seconds(
        lambda: sample(model, state.params, jax.random.key(2), data["mask"], data["labels"], steps=20, sampler="ddim"),
        max(1, repeats // 2),
    )
    return {"train sets/s": batch / train_seconds, "DDIM-20 sets/s": batch / sample_seconds}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    print(f"jax {jax.__version__} on {jax.devices()[0].platform}, batch {args.batch}")
    print("| model | n_max | attention | train sets/s | DDIM-20 sets/s |")
    print("|---|---|---|---|---|")
    for model_name in ("small", "base"):
        for n_max in (30, 150):
            for n_inducing in (0, 16):
                result = measure(model_name, n_max, n_inducing, args.batch, args.repeats)
                attention = f"ISAB-{n_inducing}" if n_inducing else "full"
                print(f"| {model_name} | {n_max} | {attention} | {result['train sets/s']:.0f} | {result['DDIM-20 sets/s']:.0f} |",
                      flush=True)


if __name__ == "__main__":
    main()
