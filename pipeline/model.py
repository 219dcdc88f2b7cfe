"""Builds the ``setdiff`` model a config describes: the one place config turns into a network, and
into the arguments the network is sampled with."""

from __future__ import annotations

import jax.numpy as jnp

from setdiff import VDM, ScoreNet, make_schedule

from .config import LossWeighting, ModelConfig, SampleConfig, Schedule
from .files import PipelineError


def build_vdm(model: ModelConfig, data_dim: int, n_classes: int) -> VDM:
    """The transformer-guided VDM for sets of ``data_dim`` features and ``n_classes`` classes."""
    weighting, schedule = LossWeighting(model.loss_weighting), Schedule(model.schedule)
    if weighting is not LossWeighting.elbo and schedule is not Schedule.fixed_linear:  # setdiff.VDM's rule, in config terms
        raise PipelineError(f"model.loss_weighting={weighting.value} trains on a loss that is not the bound, and a learned "
                            "schedule's endpoints then drift away (gamma(1) from 5 to 61 in 40 000 steps of sigmoid weighting); "
                            "set model.schedule=fixed_linear.")
    if model.self_condition and schedule is not Schedule.fixed_linear:  # setdiff.VDM's rule, in config terms
        raise PipelineError("model.self_condition=true trains a learned schedule without the gradient through the estimate "
                            "the network takes, and its endpoints then drift away (gamma(1) from 5.7 to 19 in 40 000 steps); "
                            "set model.schedule=fixed_linear.")
    score_net = ScoreNet(
        d_model=model.d_model,
        n_layers=model.n_layers,
        n_heads=model.n_heads,
        mlp_ratio=model.mlp_ratio,
        n_classes=n_classes,
        n_inducing=model.n_inducing,
        pair_bias_width=model.pair_bias_width,
        context_mlp=model.context_mlp,
        class_mlp=model.class_mlp,
        cond_drop=model.cond_drop.value,
        conditioning=model.conditioning.value,
        self_condition=model.self_condition,
        dtype=jnp.bfloat16 if model.bfloat16 else jnp.float32,
    )
    return VDM(
        score_net,
        make_schedule(model.schedule.value, model.gamma_min, model.gamma_max),
        data_dim=data_dim,
        timesteps=model.timesteps,
        cond_drop_prob=model.cond_drop_prob,
        latent_dim=model.latent_dim,
        parameterization=model.parameterization.value,
        loss_weighting=model.loss_weighting.value,
        sigmoid_bias=model.sigmoid_bias,
    )


def sampler_settings(sample: SampleConfig) -> dict:
    """The keyword arguments of ``setdiff.sample`` that the ``sample`` config sets (also the sets
    file's record of how it was sampled); refuses churn where ``setdiff.sample`` would, in config terms."""
    settings = {"steps": sample.steps, "sampler": sample.sampler.value, "guidance_scale": sample.guidance_scale,
                "rho": sample.rho, "churn": sample.churn}
    if sample.churn < 0 or (sample.churn and settings["sampler"] == "ancestral"):
        raise PipelineError(f"sample.churn={sample.churn} with sample.sampler={settings['sampler']}: churn is a fraction >= 0 "
                            "for the ddim and heun samplers (the ancestral one already adds noise at every step); set "
                            "sample.churn=0 or sample.sampler=heun.")
    return settings
