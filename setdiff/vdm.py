"""Variational diffusion model on padded sets, its loss and its likelihood.

Kingma, Salimans, Poole & Ho, "Variational Diffusion Models", arXiv:2107.00630 (VDM), applied to
sets ``x[batch, n, d]`` with a mask ``[batch, n]``. The negative ELBO of one set is the sum of three
terms (VDM eq. 11), each summed over the set's real elements only:

* ``diffusion``: continuous time (VDM eq. 17)
  ``0.5 E_t[gamma'(t) ||eps - eps_hat(z_t, t)||^2]``, or with ``T`` discrete steps (VDM eq. 15)
  ``0.5 T E_i[(exp(gamma(t_i) - gamma(s_i)) - 1) ||eps - eps_hat(z_{t_i}, t_i)||^2]``,
  ``t_i = i / T``, ``s_i = (i - 1) / T``;
* ``prior``: ``KL(q(z_1 | x) || N(0, I))``;
* ``reconstruction``: ``-log p(x | z_0)`` with the Gaussian decoder
  ``p(x | z_0) = N(x; z_0 / alpha_0, sigma_0^2 / alpha_0^2)`` for continuous data
  (``sigma_0^2 / alpha_0^2 = exp(gamma_0)``), estimated with the same ``eps`` sample.

With latent diffusion an element-wise encoder maps ``x`` to the diffused latent, each element's
latent scaled to unit root-mean-square over its features (the scale that the prior ``N(0, I)`` and
the noise schedule assume), and a decoder maps ``z_0 / alpha_0`` back to the mean of
``p(x | z_0)``, whose variance stays ``exp(gamma_0)``, as without the latent. A learned decoder
variance lets the decoder explain the data on its own: trained jointly, the encoder then
collapses to a constant (a spread of 3e-4 on the toy rings, whose samples fell back to chance)
and nothing is left to diffuse. Padded elements contribute nothing to any
term, and the score network never lets them touch a real element. Times are drawn with VDM's
antithetic ("low-discrepancy") sampler, ``t_b = (u + b / B) mod 1`` over the batch (VDM appendix I.1).

Two choices change what the network is trained on without changing the bound that is reported:

* ``parameterization="v"``: the network predicts ``v = alpha_t eps - sigma_t x`` (Salimans & Ho 2022,
  arXiv:2202.00512) and ``eps_hat = sigma_t z_t + alpha_t v_hat``. For data of unit variance this is
  the preconditioning of EDM (Karras et al. 2022, arXiv:2206.00364, table 1, with
  ``sigma_data = 1``): near pure noise the prediction of ``eps`` starts from ``z_t`` itself and the
  network's error is not amplified by ``1 / alpha_t`` in ``x_hat``, as it is with ``"eps"``.
* ``loss_weighting="sigmoid"``: the diffusion term is weighted by ``w(lambda) = sigmoid(b - lambda)``
  with ``lambda = -gamma(t)`` the log-SNR (Kingma & Gao 2023, arXiv:2303.00848, sec. 5), which moves
  the weight from almost-clean times (where the ELBO puts much of it) to the noisy times that shape
  the samples. ``ELBOTerms.diffusion`` stays the unweighted term, so the bound is reported as
  before; the training loss uses ``ELBOTerms.weighted_diffusion``.
* ``loss_weighting="elbo_plus_sigmoid"``: ``w(lambda) = 1 + sigmoid(b - lambda)``, the ELBO's own
  diffusion term plus the sigmoid-weighted one. Noisy times
  weigh up to twice what they weigh in the ELBO, and almost-clean ones keep the ELBO's weight: the
  sigmoid weighting alone leaves the network untrained near the data, where the sampler ends.
* ``loss_weighting="edm"``: EDM's training loss (Karras et al. 2022, table 1: ``ln sigma`` drawn from
  ``N(P_mean, P_std^2)`` and the denoiser's error weighted by ``(sigma^2 + sigma_data^2) / (sigma
  sigma_data)^2``) written as a weighting of the ELBO (Kingma & Gao 2023, appendix D.1):
  ``w(lambda) = N(lambda; -2 P_mean, (2 P_std)^2) (exp(-lambda) + sigma_data^2) / sigma_data^2``.
  EDM's ``P_mean = -1.2`` and ``P_std = 1.2`` are for ``sigma_data = 0.5``; the data here are
  standardised (``sigma_data = 1``), so the same distribution of ``sigma / sigma_data`` has
  ``P_mean = -1.2 + ln 2``: ``w(lambda) = N(lambda; 2.4 - 2 ln 2, 2.4^2) (exp(-lambda) + 1)``. On
  the fixed schedule (log-SNR from -5 to 13.3) it is largest at log-SNR -4.7, puts 82% of its weight
  below log-SNR 0 (the ELBO: 27%) and falls as a Gaussian towards the data (3e-7 of its largest
  value at log-SNR 13.3).

Every weighting but the ELBO's needs the fixed schedule. A learned one would be trained on a loss
that is not the bound: under ``"sigmoid"`` only the prior and reconstruction terms pull its
endpoints, and gamma(1) went from 5 to 61 in 40 000 steps; under ``"elbo_plus_sigmoid"`` the added
term pulls them through ``z_t``, and gamma(0) went from -13.3 to -4.0 in 10 000 (the val NELBO from
0.59 to 1.09 bits per dimension). ``VDM`` refuses the combination.

With a self-conditioning score network (``ScoreNet.self_condition``; Chen, Zhang & Hinton 2022,
arXiv:2208.04202) the network also takes an estimate of the clean data: a first call without one
gives ``x_hat = (z_t - sigma_t eps_hat) / alpha_t``, and the second call, whose prediction enters
the loss, takes it (no gradient flows through the first). In training, a coin per batch decides
whether the second call takes the estimate or zeros, so that the network learns both; the bound
that validation and likelihoods report always uses the estimate, as the samplers do, which feed
each step the estimate of the step before.
It needs the fixed schedule: the estimate carries no gradient, so a learned schedule's endpoints
get only part of the bound's, and on the fidelity benchmark gamma(1) went from 5.7 to 19 in
40 000 steps, leaving most of a sampler's steps at almost pure noise.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.scipy.stats import norm

from .networks import ElementwiseResidualMLP, ScoreNet
from .schedules import FixedLinearSchedule

_LOG_2PI = math.log(2.0 * math.pi)
PARAMETERIZATIONS = ("eps", "v")
LOSS_WEIGHTINGS = ("elbo", "sigmoid", "elbo_plus_sigmoid", "edm")
# EDM's training distribution of log-SNR for data of unit variance (see the module's notes)
EDM_LOG_SNR_MEAN, EDM_LOG_SNR_SD = 2.4 - 2.0 * math.log(2.0), 2.4


class ELBOTerms(NamedTuple):
    """Per-set negative-ELBO terms in nats, each ``[batch]``, and the number of real dimensions."""

    diffusion: jax.Array
    prior: jax.Array
    reconstruction: jax.Array
    n_dims: jax.Array
    weighted_diffusion: jax.Array  # the diffusion term the training loss uses (= diffusion under "elbo")

    @property
    def total(self):
        """The negative ELBO."""
        return self.diffusion + self.prior + self.reconstruction

    @property
    def objective(self):
        """The training objective: the negative ELBO with the diffusion term weighted."""
        return self.weighted_diffusion + self.prior + self.reconstruction


def _masked_sum(values, mask):
    """Sum ``values[batch, n, d]`` over the real elements and features of each set."""
    return jnp.sum(values * mask[..., None], axis=(1, 2))


class VDM(nn.Module):
    """Variational diffusion model over padded sets.

    Attributes:
      score_net: the noise predictor (``ScoreNet``).
      schedule: the ``gamma(t)`` module (see ``setdiff.schedules``).
      data_dim: features per element of the data.
      timesteps: 0 for the continuous-time bound, else the number of discrete steps ``T``.
      cond_drop_prob: probability of dropping the class/context during training (classifier-free
        guidance, Ho & Salimans 2022, arXiv:2207.12598).
      latent_dim: 0 to diffuse the data itself; otherwise diffuse a ``latent_dim``-wide element-wise
        latent made by a residual MLP encoder, decoded by another.
      parameterization: what the network predicts, ``"eps"`` or ``"v"`` (see the module's notes).
      loss_weighting: ``"elbo"`` (every log-SNR weighs the same, the bound itself), ``"sigmoid"``,
        ``"elbo_plus_sigmoid"`` or ``"edm"``.
      sigmoid_bias: ``b`` of the sigmoid weightings.
    """

    score_net: ScoreNet
    schedule: nn.Module
    data_dim: int
    parameterization: str
    timesteps: int = 0
    cond_drop_prob: float = 0.0
    latent_dim: int = 0
    loss_weighting: str = "elbo"
    sigmoid_bias: float = 0.0

    @property
    def diffused_dim(self) -> int:
        """Features per element of the diffused variable: the latent width, or the data's."""
        return self.latent_dim or self.data_dim

    def loss_weight(self, gamma_t):
        """``w(lambda)``, ``lambda = -gamma_t``, by which the training loss weighs the ELBO's diffusion term
        at each time (see the module's notes); the weightings other than the ELBO's hold no parameter,
        since they need the fixed schedule."""
        log_snr = -gamma_t
        if self.loss_weighting == "elbo":
            return jnp.ones_like(log_snr)
        if self.loss_weighting == "edm":
            density = norm.pdf(log_snr, EDM_LOG_SNR_MEAN, EDM_LOG_SNR_SD)
            return density * (jnp.exp(-log_snr) + 1.0)
        sigmoid = nn.sigmoid(self.sigmoid_bias - log_snr)
        return 1.0 + sigmoid if self.loss_weighting == "elbo_plus_sigmoid" else sigmoid

    def setup(self):
        if self.parameterization not in PARAMETERIZATIONS:
            raise ValueError(f"unknown parameterization {self.parameterization!r}: choose one of {PARAMETERIZATIONS}")
        if self.loss_weighting not in LOSS_WEIGHTINGS:
            raise ValueError(f"unknown loss weighting {self.loss_weighting!r}: choose one of {LOSS_WEIGHTINGS}")
        if self.loss_weighting != "elbo" and not isinstance(self.schedule, FixedLinearSchedule):
            raise ValueError(f"loss weighting {self.loss_weighting!r} would train a learned schedule on a loss that is not "
                             "the bound, which drives its endpoints away; use the fixed schedule with it")
        if self.score_net.self_condition and not isinstance(self.schedule, FixedLinearSchedule):
            raise ValueError("self-conditioning trains a learned schedule without the gradient through the estimate it "
                             "takes, which drives its endpoints away; use the fixed schedule with it")
        if self.latent_dim:
            self.encoder = ElementwiseResidualMLP(self.latent_dim)
            self.decoder = ElementwiseResidualMLP(self.data_dim)

    def gamma(self, t):
        """``gamma(t) = -log SNR(t)``."""
        return self.schedule(t)

    def eps_hat(self, z, t, mask, labels=None, context=None, cond_keep=None, x_self=None):
        """The noise prediction at times ``t[batch]``: the network's output itself, or with
        ``parameterization="v"`` ``sigma_t z + alpha_t v_hat``. ``x_self``: the estimate of the clean
        data a self-conditioning network takes (ignored by one that does not)."""
        output = self.score_net(z, t, mask, labels, context, cond_keep, x_self)
        if self.parameterization == "eps":
            return output
        gamma_t = self.gamma(t)[:, None, None]
        return (jnp.sqrt(nn.sigmoid(gamma_t)) * z + jnp.sqrt(nn.sigmoid(-gamma_t)) * output) * mask[..., None]

    def x_hat(self, z, t, eps_hat):
        """The estimate of the clean (diffused) data, ``(z_t - sigma_t eps_hat) / alpha_t``."""
        gamma_t = self.gamma(t)[:, None, None]
        return (z - jnp.sqrt(nn.sigmoid(gamma_t)) * eps_hat) / jnp.sqrt(nn.sigmoid(-gamma_t))

    def encode(self, x):
        """Map data to the diffused space: identity without latent diffusion, else the encoder's
        output scaled to unit root-mean-square over each element's features."""
        if not self.latent_dim:
            return x
        latent = self.encoder(x)
        return latent * jax.lax.rsqrt(jnp.mean(jnp.square(latent), axis=-1, keepdims=True) + 1e-6)

    def decode(self, z_0_scaled):
        """Mean and log-variance of ``p(x | z_0)`` given ``z_0 / alpha_0``.

        The log-variance is ``gamma(0)``; the mean is ``z_0 / alpha_0`` itself, or with latent
        diffusion the decoder MLP's output.
        """
        mean = self.decoder(z_0_scaled) if self.latent_dim else z_0_scaled
        return mean, self.gamma(jnp.zeros(()))

    def __call__(self, x, mask, labels=None, context=None, t=None, set_ids=None, n_sets=None, train: bool = False):
        """Per-set negative-ELBO terms (nats) for a batch of sets.

        Randomness comes from the ``"diffusion"`` rng stream (times and noise) and, when ``train`` and
        ``cond_drop_prob > 0``, the ``"cond_drop"`` stream (classifier-free-guidance dropout). Each
        set's noise and dropout are drawn from the stream folded with the set's index ``set_ids[b]``
        in a global batch of ``n_sets`` sets (default: this batch), and its antithetic time is
        ``(u + set_ids[b] / n_sets) mod 1``: a batch split across devices then draws exactly what
        the whole batch would. ``t`` (``[batch]``) evaluates at chosen times instead.
        """
        batch, n_max, data_dim = x.shape
        mask = mask.astype(bool)
        x = x * mask[..., None]
        if set_ids is None:
            set_ids = jnp.arange(batch)
        n_sets = batch if n_sets is None else n_sets
        time_rng, noise_rng = jax.random.split(self.make_rng("diffusion"))
        if t is None:
            t = jnp.mod(jax.random.uniform(time_rng, ()) + set_ids / n_sets, 1.0)
        if self.timesteps:
            t = jnp.ceil(t * self.timesteps) / self.timesteps
            t = jnp.maximum(t, 1.0 / self.timesteps)

        cond_keep = None
        if train and self.cond_drop_prob > 0:
            drop_rng = self.make_rng("cond_drop")
            u = jax.vmap(lambda i: jax.random.uniform(jax.random.fold_in(drop_rng, i), ()))(set_ids)
            cond_keep = u >= self.cond_drop_prob

        x_diffused = self.encode(x) * mask[..., None]
        draw_noise = lambda i: jax.random.normal(jax.random.fold_in(noise_rng, i), (n_max, self.diffused_dim))  # noqa: E731
        eps = jax.vmap(draw_noise)(set_ids) * mask[..., None]

        if self.timesteps:
            gamma_t = self.gamma(t)
            gamma_s = self.gamma(t - 1.0 / self.timesteps)
            weight = 0.5 * self.timesteps * jnp.expm1(gamma_t - gamma_s)
        else:
            gamma_t, gamma_rate = nn.jvp(
                lambda schedule, time: schedule(time), self.schedule, (t,), (jnp.ones_like(t),), {}
            )
            weight = 0.5 * gamma_rate
        alpha_t = jnp.sqrt(nn.sigmoid(-gamma_t))[:, None, None]
        sigma_t = jnp.sqrt(nn.sigmoid(gamma_t))[:, None, None]
        z_t = alpha_t * x_diffused + sigma_t * eps
        x_self = None
        if self.score_net.self_condition:
            estimate = lambda vdm, z: vdm.x_hat(z, t, vdm.eps_hat(z, t, mask, labels, context, cond_keep))  # noqa: E731
            if train:  # one coin for the batch, the same on every device of a data-parallel step
                no_estimate = lambda vdm, z: jnp.zeros_like(z)  # noqa: E731
                x_self = nn.cond(jax.random.bernoulli(self.make_rng("diffusion")), estimate, no_estimate, self, z_t)
            else:
                x_self = estimate(self, z_t)
            x_self = jax.lax.stop_gradient(x_self)
        eps_hat = self.eps_hat(z_t, t, mask, labels, context, cond_keep, x_self)
        squared_error = _masked_sum(jnp.square(eps - eps_hat), mask)
        diffusion = weight * squared_error
        weighted_diffusion = diffusion * self.loss_weight(gamma_t)

        gamma_1 = self.gamma(jnp.ones(()))
        kl_per_dim = 0.5 * (
            nn.sigmoid(gamma_1) + nn.sigmoid(-gamma_1) * jnp.square(x_diffused) - nn.log_sigmoid(gamma_1) - 1.0
        )
        prior = _masked_sum(kl_per_dim, mask)

        gamma_0 = self.gamma(jnp.zeros(()))
        z_0_scaled = x_diffused + jnp.exp(0.5 * gamma_0) * eps  # z_0 / alpha_0
        mean, log_var = self.decode(z_0_scaled)
        nll_per_dim = 0.5 * (_LOG_2PI + log_var + jnp.square(x - mean) * jnp.exp(-log_var))
        reconstruction = _masked_sum(nll_per_dim, mask)

        n_dims = jnp.sum(mask, axis=1) * data_dim
        return ELBOTerms(diffusion, prior, reconstruction, n_dims, weighted_diffusion)


def vdm_loss(model: VDM, params, rng, x, mask, labels=None, context=None, *, n_dims_total=None, set_ids=None, n_sets=None):
    """Training loss: the batch's objective (the negative ELBO, its diffusion term weighted as the
    model says) in bits per real dimension.

    All sets' terms are summed and divided by the number of real dimensions in the batch, so every
    real element weighs the same whatever the padding. A data-parallel step passes the global count
    ``n_dims_total`` (so per-device losses add up to the global one) and each set's global index
    ``set_ids`` in a global batch of ``n_sets`` (see ``VDM.__call__``).

    Returns:
      ``(loss, aux)`` where ``aux`` holds the negative ELBO (``nelbo_bpd``) and each of its terms in
      bits per dimension.
    """
    diffusion_rng, drop_rng = jax.random.split(rng)
    terms = model.apply(
        params,
        x,
        mask,
        labels,
        context,
        set_ids=set_ids,
        n_sets=n_sets,
        train=True,
        rngs={"diffusion": diffusion_rng, "cond_drop": drop_rng},
    )
    if n_dims_total is None:
        n_dims_total = jnp.sum(terms.n_dims)
    to_bpd = 1.0 / (n_dims_total * math.log(2.0))
    aux = {
        "nelbo_bpd": jnp.sum(terms.total) * to_bpd,
        "diffusion_bpd": jnp.sum(terms.diffusion) * to_bpd,
        "prior_bpd": jnp.sum(terms.prior) * to_bpd,
        "reconstruction_bpd": jnp.sum(terms.reconstruction) * to_bpd,
    }
    return jnp.sum(terms.objective) * to_bpd, aux


def nelbo(model: VDM, params, rng, x, mask, labels=None, context=None, n_samples: int = 16):
    """Per-set negative ELBO in bits per dimension, averaged over ``n_samples`` times per set.

    Times are stratified per set (``t_k = (u + k) / K``), which keeps the estimate unbiased with less
    variance than independent draws. Uses the model's own bound (continuous or discrete time). The
    conditioning is never dropped. Returns ``[batch]``; lower means more likely.
    """
    batch = x.shape[0]
    offset_rng, sample_rng = jax.random.split(rng)
    offsets = jax.random.uniform(offset_rng, (batch,))

    def one_sample(k, sample_key):
        t = jnp.mod(offsets + k / n_samples, 1.0)
        return model.apply(params, x, mask, labels, context, t=t, rngs={"diffusion": sample_key})

    terms = jax.vmap(one_sample)(jnp.arange(n_samples), jax.random.split(sample_rng, n_samples))
    return jnp.mean(terms.total, axis=0) / (jnp.maximum(terms.n_dims[0], 1) * math.log(2.0))
