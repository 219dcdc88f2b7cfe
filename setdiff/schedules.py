"""Noise schedules gamma(t) = -log SNR(t) for the variational diffusion model.

Kingma, Salimans, Poole & Ho, "Variational Diffusion Models", arXiv:2107.00630 (VDM).
The forward process is ``z_t = alpha_t x + sigma_t eps`` with ``alpha_t^2 = sigmoid(-gamma(t))`` and
``sigma_t^2 = sigmoid(gamma(t))`` (VDM eq. 3-4), so ``SNR(t) = exp(-gamma(t))``. Every schedule here
is a Flax module mapping ``t`` in [0, 1] to ``gamma(t)``, strictly increasing in ``t``.
"""

from __future__ import annotations

import flax.linen as nn
import jax.numpy as jnp

# VDM's defaults for continuous data: log-SNR from +13.3 (almost clean) down to -5 (almost pure noise).
GAMMA_MIN = -13.3
GAMMA_MAX = 5.0


class FixedLinearSchedule(nn.Module):
    """Fixed linear log-SNR: ``gamma(t) = gamma_min + (gamma_max - gamma_min) t`` (VDM sec. 3.2)."""

    gamma_min: float = GAMMA_MIN
    gamma_max: float = GAMMA_MAX

    def __call__(self, t):
        return self.gamma_min + (self.gamma_max - self.gamma_min) * t


class LearnedLinearSchedule(nn.Module):
    """Linear log-SNR with learned endpoints: ``gamma(t) = b + |w| t``.

    ``b = gamma(0)`` and ``b + |w| = gamma(1)`` start at ``gamma_min`` and ``gamma_max``; the absolute
    value keeps the schedule increasing whatever the optimiser does.
    """

    gamma_min: float = GAMMA_MIN
    gamma_max: float = GAMMA_MAX

    @nn.compact
    def __call__(self, t):
        b = self.param("gamma_0", lambda _: jnp.asarray(self.gamma_min, jnp.float32))
        w = self.param("gamma_range", lambda _: jnp.asarray(self.gamma_max - self.gamma_min, jnp.float32))
        return b + jnp.abs(w) * t


class _PositiveDense(nn.Module):
    """Dense layer whose weights are made positive with softplus, so it is monotone in its input."""

    features: int

    @nn.compact
    def __call__(self, x):
        kernel = self.param("kernel", nn.initializers.normal(1.0), (x.shape[-1], self.features))
        bias = self.param("bias", nn.initializers.zeros, (self.features,))
        return x @ nn.softplus(kernel) + bias


class LearnedMonotonicSchedule(nn.Module):
    """The monotonic network schedule ``gamma_eta(t)`` of VDM (sec. 3.5 and appendix H).

    ``g(t) = l1(t) + l3(phi(l2(l1(t))))`` with positive-weight linear layers ``l1``, ``l2``
    (``hidden`` units), ``l3`` and the increasing activation ``phi = sigmoid``; ``g`` is therefore
    strictly increasing. It is then rescaled so its endpoints are the learned scalars
    ``gamma(0) = gamma_0`` and ``gamma(1) = gamma_0 + |gamma_range|``:
    ``gamma(t) = gamma_0 + |gamma_range| (g(t) - g(0)) / (g(1) - g(0))``.
    """

    gamma_min: float = GAMMA_MIN
    gamma_max: float = GAMMA_MAX
    hidden: int = 1024

    @nn.compact
    def __call__(self, t):
        gamma_0 = self.param("gamma_0", lambda _: jnp.asarray(self.gamma_min, jnp.float32))
        gamma_range = self.param("gamma_range", lambda _: jnp.asarray(self.gamma_max - self.gamma_min, jnp.float32))
        l1 = _PositiveDense(1, name="l1")
        l2 = _PositiveDense(self.hidden, name="l2")
        l3 = _PositiveDense(1, name="l3")

        def g(time):
            h = l1(time[..., None])
            return (h + l3(nn.sigmoid(l2(h))) / self.hidden)[..., 0]

        t = jnp.asarray(t, jnp.float32)
        g_0, g_1 = g(jnp.zeros(())), g(jnp.ones(()))
        return gamma_0 + jnp.abs(gamma_range) * (g(t) - g_0) / (g_1 - g_0)


SCHEDULES = {
    "fixed_linear": FixedLinearSchedule,
    "learned_linear": LearnedLinearSchedule,
    "learned_monotonic": LearnedMonotonicSchedule,
}


def make_schedule(name: str, gamma_min: float = GAMMA_MIN, gamma_max: float = GAMMA_MAX) -> nn.Module:
    """Build a schedule by name (one of ``SCHEDULES``)."""
    if name not in SCHEDULES:
        raise ValueError(f"unknown noise schedule {name!r}: choose one of {sorted(SCHEDULES)}")
    return SCHEDULES[name](gamma_min=gamma_min, gamma_max=gamma_max)
