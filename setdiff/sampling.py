"""Samplers for a trained ``VDM``: each runs as one jitted ``lax.fori_loop`` over its steps.

* ``"ancestral"``: VDM's ancestral sampler (Kingma et al. 2021, arXiv:2107.00630, appendix A.4):
  ``z_s ~ p(z_s | z_t) = q(z_s | z_t, x = x_hat(z_t))`` on ``N`` equal steps of ``t``, i.e.
  ``z_s = alpha_s / alpha_t (z_t - c sigma_t eps_hat) + sqrt(c) sigma_s eps'`` with
  ``c = 1 - exp(gamma_s - gamma_t)``.
* ``"ddim"``: the deterministic probability-flow sampler of Song, Meng & Ermon 2021
  (arXiv:2010.02502, eta = 0), which is Euler's method on the ODE ``dy/dsigma = eps_hat`` in the
  variables ``y = z / alpha`` and ``sigma = sigma_t / alpha_t = exp(gamma / 2)``.
* ``"heun"``: Heun's second-order method on that same ODE (Karras et al. 2022, arXiv:2206.00364,
  algorithm 1), two network calls per step, so far fewer steps are needed.

All end at ``t = 0`` and return the decoder's mean ``E[x | z_0]``, zero on padded elements. The steps
are equal in ``t`` by default, which with a linear log-SNR schedule (the package's schedules) are
equal steps of ``log sigma``. With ``rho > 0`` the noise levels ``sigma = sigma_t / alpha_t`` follow
EDM's spacing instead (Karras et al. 2022, eq. 5): ``sigma_i^(1/rho)`` equally spaced between the
schedule's ``sigma(1)`` and ``sigma(0)``: against equal steps of ``log sigma``, shorter ones at high
noise and longer ones near the data (Karras et al. choose ``rho = 7``).
With ``churn > 0`` the ``"ddim"`` and ``"heun"`` steps become EDM's stochastic sampler (Karras et al.
2022, algorithm 2 with ``S_churn / N = churn``, ``S_noise = 1``, every step): each step first adds noise
that raises the noise level from ``sigma`` to ``(1 + churn) sigma`` (at most ``sigma(1)``), then takes its
deterministic step from there, so that errors of earlier steps are partly forgotten.
Classifier-free guidance (Ho & Salimans 2022, arXiv:2207.12598) mixes conditional and unconditional
predictions as ``(1 + w) eps(z, c) - w eps(z, none)`` with guidance scale ``w``.
A self-conditioning network (``ScoreNet.self_condition``) is given, at every call, the estimate of
the clean data ``x_hat = (z - sigma eps_hat) / alpha`` from the call before (zeros at the first),
as Chen, Zhang & Hinton 2022 (arXiv:2208.04202) sample.
"""

from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp
from flax import linen as nn

from .vdm import VDM

SAMPLERS = ("ancestral", "ddim", "heun")


def _noise_predictor(model: VDM, params, mask, labels, context, guidance_scale: float):
    """``eps(z, t, x_self)`` for a scalar time, with classifier-free guidance when
    ``guidance_scale != 0``; ``x_self`` is the estimate a self-conditioning network takes."""
    batch = mask.shape[0]
    conditional = labels is not None or context is not None

    def eps(z, t, x_self):
        times = jnp.full((batch,), t)
        if not (conditional and guidance_scale):
            return model.apply(params, z, times, mask, labels, context, None, x_self, method=VDM.eps_hat)
        both = lambda a: None if a is None else jnp.concatenate([a, a])  # noqa: E731
        keep = jnp.concatenate([jnp.ones((batch,), bool), jnp.zeros((batch,), bool)])
        eps_both = model.apply(
            params, both(z), both(times), both(mask), both(labels), both(context), keep, both(x_self), method=VDM.eps_hat
        )
        eps_cond, eps_uncond = eps_both[:batch], eps_both[batch:]
        return (1.0 + guidance_scale) * eps_cond - guidance_scale * eps_uncond

    return eps


def time_grid(gamma_0, gamma_1, steps: int, rho: float = 0.0):
    """The ``steps + 1`` times ``1 = t_0 > ... > t_steps = 0`` a sampler visits: equal steps of ``t``
    for ``rho = 0``, else the times whose noise levels ``sigma = exp(gamma / 2)`` follow EDM's
    spacing with exponent ``rho`` (Karras et al. 2022, arXiv:2206.00364, eq. 5) between ``gamma_1 =
    gamma(1)`` and ``gamma_0 = gamma(0)``. Assumes a schedule linear in ``t``, as every schedule of
    ``setdiff.schedules`` is."""
    fraction = jnp.arange(steps + 1) / steps
    if not rho:
        return 1.0 - fraction
    root_sigma = lambda gamma: jnp.exp(gamma / (2.0 * rho))  # sigma^(1/rho)  # noqa: E731
    gammas = 2.0 * rho * jnp.log(root_sigma(gamma_1) + fraction * (root_sigma(gamma_0) - root_sigma(gamma_1)))
    times = (gammas - gamma_0) / (gamma_1 - gamma_0)
    return jnp.clip(times, 0.0, 1.0).at[0].set(1.0).at[-1].set(0.0)


# The arguments of ``sample`` that shape its program; each distinct value compiles it again.
STATIC_ARGNAMES = ("model", "steps", "sampler", "guidance_scale", "rho", "churn")


@partial(jax.jit, static_argnames=STATIC_ARGNAMES)
def sample(
    model: VDM,
    params,
    rng,
    mask,
    labels=None,
    context=None,
    *,
    steps: int = 100,
    sampler: str = "ancestral",
    guidance_scale: float = 0.0,
    rho: float = 0.0,
    churn: float = 0.0,
):
    """Draw sets from ``model`` with the given padding ``mask[batch, n]``.

    Args:
      model, params: the ``VDM`` and its variables.
      rng: PRNG key.
      mask: ``[batch, n]`` bool; fixes how many elements each generated set has.
      labels, context: optional conditioning, as in training.
      steps: number of sampler steps ``N`` (Heun makes ``2 N - 1`` network calls).
      sampler: one of ``SAMPLERS``.
      guidance_scale: classifier-free guidance weight ``w`` (0 = plain conditional sampling).
      rho: 0 for equal steps of ``t``, else EDM's spacing of the noise levels (:func:`time_grid`).
      churn: 0 for the deterministic ``"ddim"`` and ``"heun"``, else EDM's stochastic sampler with
        ``S_churn / N = churn`` (the noise level raised by that fraction before every step).

    Returns:
      ``[batch, n, d]`` samples in the model's data space.
    """
    if sampler not in SAMPLERS:
        raise ValueError(f"unknown sampler {sampler!r}: choose one of {SAMPLERS}")
    if churn < 0 or (churn and sampler == "ancestral"):
        raise ValueError(f"churn={churn}: give 0, or a positive fraction with the ddim or heun sampler")
    mask = mask.astype(bool)
    eps = _noise_predictor(model, params, mask, labels, context, guidance_scale)
    gamma = lambda t: model.apply(params, t, method=VDM.gamma)  # noqa: E731
    init_rng, loop_rng = jax.random.split(rng)
    z_1 = jax.random.normal(init_rng, mask.shape + (model.diffused_dim,)) * mask[..., None]
    times = time_grid(gamma(0.0), gamma(1.0), steps, rho)
    time = lambda i: times[i]  # step i goes from time(i) to time(i + 1)  # noqa: E731

    # The estimate of the clean data each call hands the next (zeros: the network takes none).
    x_self_0 = jnp.zeros_like(z_1)

    if sampler == "ancestral":

        def step(i, state):
            z_t, x_self = state
            t, s = time(i), time(i + 1)
            gamma_t, gamma_s = gamma(t), gamma(s)
            eps_t = eps(z_t, t, x_self)
            c = -jnp.expm1(gamma_s - gamma_t)
            alpha_ratio = jnp.sqrt(nn.sigmoid(-gamma_s) / nn.sigmoid(-gamma_t))
            mean = alpha_ratio * (z_t - c * jnp.sqrt(nn.sigmoid(gamma_t)) * eps_t)
            noise = jax.random.normal(jax.random.fold_in(loop_rng, i), z_t.shape)
            x_hat = model.apply(params, z_t, jnp.full(mask.shape[:1], t), eps_t, method=VDM.x_hat)
            return mean + jnp.sqrt(c * nn.sigmoid(gamma_s)) * noise * mask[..., None], x_hat

        z_0, _ = jax.lax.fori_loop(0, steps, step, (z_1, x_self_0))
        y_0 = z_0 / jnp.sqrt(nn.sigmoid(-gamma(0.0)))
    else:
        noise_scale = lambda t: jnp.exp(0.5 * gamma(t))  # sigma_t / alpha_t  # noqa: E731
        alpha = lambda t: jnp.sqrt(nn.sigmoid(-gamma(t)))  # noqa: E731

        gamma_0, gamma_1 = gamma(0.0), gamma(1.0)

        def step(i, state):  # in y = z / alpha, whose clean-data estimate is y - sigma_t / alpha_t eps
            y_t, x_self = state
            t, s = time(i), time(i + 1)
            if churn:  # up from sigma(t) to (1 + churn) sigma(t), the time of that level on the linear schedule
                t_raised = jnp.minimum((gamma(t) + 2.0 * jnp.log1p(churn) - gamma_0) / (gamma_1 - gamma_0), 1.0)
                added = jnp.sqrt(jnp.maximum(noise_scale(t_raised) ** 2 - noise_scale(t) ** 2, 0.0))
                noise = jax.random.normal(jax.random.fold_in(loop_rng, i), y_t.shape) * mask[..., None]
                y_t, t = y_t + added * noise, t_raised
            slope_t = eps(y_t * alpha(t), t, x_self)
            y_euler = y_t + (noise_scale(s) - noise_scale(t)) * slope_t
            x_hat = y_t - noise_scale(t) * slope_t
            if sampler == "ddim":
                return y_euler, x_hat
            slope_s = eps(y_euler * alpha(s), s, x_hat)
            return y_t + (noise_scale(s) - noise_scale(t)) * 0.5 * (slope_t + slope_s), y_euler - noise_scale(s) * slope_s

        y_0, _ = jax.lax.fori_loop(0, steps, step, (z_1 / alpha(1.0), x_self_0))

    mean, _ = model.apply(params, y_0, method=VDM.decode)
    return mean * mask[..., None]
