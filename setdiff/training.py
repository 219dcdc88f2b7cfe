"""A pure, data-parallel-ready training step for ``VDM``.

``train_step`` knows nothing of files or devices: it is jitted as it is, or ``jax.pmap``-ed with an
``axis_name`` by the caller, in which case gradients and metrics are reduced with ``lax.psum`` so
that ``n`` devices with ``B / n`` sets each compute exactly the update of one device with ``B`` sets.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import struct

from .vdm import VDM, vdm_loss


class TrainState(struct.PyTreeNode):
    """Parameters, their exponential moving average (used for sampling) and the optimiser state."""

    step: jax.Array
    params: Any
    ema_params: Any
    opt_state: Any


def learning_rate_schedule(learning_rate: float, total_steps: int, warmup_steps: int = 0) -> optax.Schedule:
    """Linear warmup over ``warmup_steps`` to ``learning_rate``, then cosine decay to zero at ``total_steps``."""
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0 if warmup_steps else learning_rate,
        peak_value=learning_rate,
        warmup_steps=warmup_steps,
        decay_steps=max(total_steps, warmup_steps + 1),
    )


def make_optimizer(
    learning_rate: float,
    total_steps: int,
    warmup_steps: int = 0,
    weight_decay: float = 0.0,
    grad_clip: float = 1.0,
) -> optax.GradientTransformation:
    """AdamW (Loshchilov & Hutter, arXiv:1711.05101) on :func:`learning_rate_schedule`, after
    clipping the global gradient norm to ``grad_clip``. Weight decay acts on the weight matrices
    (kernels, embeddings) only, not on biases, LayerNorm scales or the noise schedule's endpoints
    (:func:`decays`), as in VDM's reference code."""
    schedule = learning_rate_schedule(learning_rate, total_steps, warmup_steps)
    return optax.chain(optax.clip_by_global_norm(grad_clip), optax.adamw(schedule, weight_decay=weight_decay, mask=decays))


def decays(params):
    """Which parameters weight decay shrinks: those with at least two axes (weight matrices)."""
    return jax.tree.map(lambda parameter: jnp.ndim(parameter) >= 2, params)


def init_params(model: VDM, rng, batch: dict):
    """Initialise the model's variables from an example ``batch`` (see ``train_step``).

    Compiled as one program: run eagerly, every one of the initialisation's hundreds of operations
    would be compiled on its own, which takes seconds."""
    params_rng, diffusion_rng = jax.random.split(rng)
    inputs = (batch["x"], batch["mask"], batch.get("labels"), batch.get("context"))
    return jax.jit(model.init)({"params": params_rng, "diffusion": diffusion_rng}, *inputs)


def create_train_state(model: VDM, rng, batch: dict, optimizer: optax.GradientTransformation) -> TrainState:
    """A fresh ``TrainState``; the EMA starts equal to the parameters."""

    def fresh_state(rng, batch):
        params = init_params(model, rng, batch)
        return TrainState(step=jnp.zeros((), jnp.int32), params=params, ema_params=params, opt_state=optimizer.init(params))

    return jax.jit(fresh_state)(rng, batch)


def train_step(
    state: TrainState,
    batch: dict,
    rng,
    *,
    model: VDM,
    optimizer: optax.GradientTransformation,
    ema_decay: float = 0.999,
    axis_name: str | None = None,
    dims_per_batch: float | None = None,
):
    """One optimiser step on ``batch`` = ``{"x", "mask"[, "labels", "context"]}``.

    Under ``pmap(..., axis_name=axis_name)`` each device holds a consecutive shard of the batch and
    the same ``rng``: every set draws its noise from its global index, the loss is normalised over
    the whole batch and gradients are summed across devices, so the update equals that of the whole
    batch on one device, whatever the split.

    The loss is the batch's summed negative ELBO divided by ``dims_per_batch``, the expected number
    of real dimensions in a batch (the batch size times the data's mean multiplicity times the
    features): every real dimension then weighs the same in every batch, so the objective is the
    dataset's NELBO per dimension whatever decides which sets share a batch (batches grouped by
    multiplicity would otherwise up-weight the elements of small sets, divided by a smaller count).
    ``None`` divides by the batch's own count instead.

    Returns:
      ``(new_state, metrics)`` with the loss and its terms in bits per dimension, the gradient norm
      and the noise schedule's endpoints ``gamma_0`` and ``gamma_1`` under the averaged parameters.
    """
    n_local = batch["x"].shape[0]
    n_dims = jnp.sum(batch["mask"]) * batch["x"].shape[-1]
    set_ids = jnp.arange(n_local)
    if axis_name:
        n_dims = jax.lax.psum(n_dims, axis_name)
        set_ids = set_ids + jax.lax.axis_index(axis_name) * n_local
    if dims_per_batch is not None:
        n_dims = dims_per_batch
    n_sets = jax.lax.psum(n_local, axis_name) if axis_name else n_local

    def loss_fn(params):
        return vdm_loss(
            model,
            params,
            rng,
            batch["x"],
            batch["mask"],
            batch.get("labels"),
            batch.get("context"),
            n_dims_total=n_dims,
            set_ids=set_ids,
            n_sets=n_sets,
        )

    (loss, terms), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    if axis_name:
        loss, terms, grads = jax.lax.psum((loss, terms, grads), axis_name)
    updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    # EMA with warmup: the decay grows as (1 + n) / (10 + n) up to ema_decay, so early parameters
    # are forgotten quickly and short runs still get a useful average.
    decay = jnp.minimum(ema_decay, (1.0 + state.step) / (10.0 + state.step))
    ema_params = optax.incremental_update(params, state.ema_params, step_size=1.0 - decay)
    # The endpoints of the noise schedule the averaged parameters sample with: a learned schedule
    # whose gamma(1) climbs far past the data's scale (log SNR well below -6) spends its time axis
    # on noise the network can only answer with the mean, and its samples worsen.
    gamma_0, gamma_1 = model.apply(ema_params, jnp.array([0.0, 1.0]), method=VDM.gamma)
    metrics = {"loss_bpd": loss, **terms, "grad_norm": optax.tree.norm(grads), "gamma_0": gamma_0, "gamma_1": gamma_1}
    return state.replace(step=state.step + 1, params=params, ema_params=ema_params, opt_state=opt_state), metrics


def fit(
    model: VDM,
    make_batch,
    steps: int,
    rng,
    *,
    learning_rate: float = 1e-3,
    warmup_steps: int = 100,
    ema_decay: float = 0.999,
    on_metrics=None,
    compiler_options: dict | None = None,
) -> TrainState:
    """Train ``model`` on one device for ``steps`` steps; ``make_batch(step)`` returns a batch dict.

    ``on_metrics(step, metrics)``, if given, is called with each step's metrics (host values).
    ``compiler_options`` go to ``jax.jit`` for the training step (XLA options, such as
    ``{"xla_backend_optimization_level": 1}`` where the process's ``XLA_FLAGS`` turn optimisation off).
    A small loop for toy problems and tests; the pipeline's training stage adds data-parallelism,
    checkpoints and validation on top of the same ``train_step``.
    """
    optimizer = make_optimizer(learning_rate, steps, warmup_steps)
    init_rng, rng = jax.random.split(rng)
    state = create_train_state(model, init_rng, make_batch(0), optimizer)
    step_fn = jax.jit(lambda s, b, r: train_step(s, b, r, model=model, optimizer=optimizer, ema_decay=ema_decay),
                      compiler_options=compiler_options)
    for step in range(steps):
        state, metrics = step_fn(state, make_batch(step), jax.random.fold_in(rng, step))
        if on_metrics is not None:
            on_metrics(step, jax.device_get(metrics))
    return state
