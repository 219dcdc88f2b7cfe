"""Noise schedules gamma(t) = -log SNR(t) for the variational diffusion model.

Kingma, Salimans, Poole & Ho, "Variational Diffusion Models", arXiv:2107.00630 (VDM).
The forward process is ``z_t = alpha_t x + sigma_t eps`` with ``alpha_t^2 = sigmoid(-gamma(t))`` and
``sigma_t^2 = sigmoid(gamma(t))`` (VDM eq. 3-4), so ``SNR(t) = exp(-gamma(t))``. Every schedule here
is a Flax module mapping ``t`` in [0, 1] to ``gamma(t)``, strictly increasing in ``t``.

Only schedules whose shape is fixed are offered. Under the continuous-time bound (VDM eq. 17) the
diffusion loss depends on the schedule through its endpoints alone (VDM sec. 3.3: it is an integral
over log-SNR), so the interior of a learned monotonic network would get no gradient in expectation,
only noise; VDM trains such an interior on the variance of the loss instead (appendix I.2), which
this library does not implement.
"""

from __future__ import annotations

import flax.linen as nn
import jax.numpy as jnp

from .constants import GAMMA_MAX, GAMMA_MIN


class FixedLinearSchedule(nn.Module):
    """Fixed linear log-SNR: ``gamma(t) = gamma_min + (gamma_max - gamma_min) t`` (VDM sec. 3.2)."""

    gamma_min: float = GAMMA_MIN
    gamma_max: float = GAMMA_MAX

    def __call__(self, t):
        return self.gamma_min + (self.gamma_max - self.gamma_min) * t


class LearnedLinearSchedule(nn.Module):
    """Linear log-SNR with learned endpoints: ``gamma(t) = b + |w| t``.

    ``b = gamma(0)`` and ``b + |w| = gamma(1)`` start at ``gamma_min`` and ``gamma_max``; the absolute
    value keeps the schedule increasing whatever the optimiser does. ``gamma(0)`` never goes below
    ``gamma_min``: it sets the width ``exp(gamma(0) / 2)`` of the decoder ``p(x | z_0)`` (VDM eq. 11),
    and data on a lower-dimensional surface (jets that keep all their constituents satisfy
    ``sum pt_rel cos(phi_rel) = 1`` exactly) would otherwise let a shrinking ``gamma(0)`` push the
    reconstruction term, and so the NELBO, down without bound. The floor bounds the reconstruction
    term per dimension below by ``(log(2 pi) + gamma_min) / 2`` nats.
    """

    gamma_min: float = GAMMA_MIN
    gamma_max: float = GAMMA_MAX

    @nn.compact
    def __call__(self, t):
        b = self.param("gamma_0", lambda _: jnp.asarray(self.gamma_min, jnp.float32))
        w = self.param("gamma_range", lambda _: jnp.asarray(self.gamma_max - self.gamma_min, jnp.float32))
        return jnp.maximum(b, self.gamma_min) + jnp.abs(w) * t


SCHEDULES = {
    "fixed_linear": FixedLinearSchedule,
    "learned_linear": LearnedLinearSchedule,
}


def make_schedule(name: str, gamma_min: float = GAMMA_MIN, gamma_max: float = GAMMA_MAX) -> nn.Module:
    """Build a schedule by name (one of ``SCHEDULES``)."""
    if name not in SCHEDULES:
        raise ValueError(f"unknown noise schedule {name!r}: choose one of {sorted(SCHEDULES)}")
    return SCHEDULES[name](gamma_min=gamma_min, gamma_max=gamma_max)
