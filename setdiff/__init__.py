"""setdiff: variational diffusion models on padded sets, in JAX and Flax.

A generic library: it knows nothing of jets, files, MLflow or Hydra. The whole public API::

    model = VDM(ScoreNet(d_model=128, n_classes=3), make_schedule("learned_linear"), data_dim=3)
    params = init_params(model, rng, batch)                      # batch = {"x", "mask", "labels"}
    loss, terms = vdm_loss(model, params, rng, x, mask, labels)  # bits per dimension
    samples = sample(model, params, rng, mask, labels, steps=50, sampler="heun")
    bits_per_dim = nelbo(model, params, rng, x, mask, labels, n_samples=16)

References: Kingma et al. 2021, "Variational Diffusion Models", arXiv:2107.00630.
"""

from .networks import ElementwiseResidualMLP, ScoreNet
from .sampling import SAMPLERS, sample
from .schedules import (
    SCHEDULES,
    FixedLinearSchedule,
    LearnedLinearSchedule,
    make_schedule,
)
from .training import TrainState, create_train_state, fit, init_params, learning_rate_schedule, make_optimizer, train_step
from .vdm import VDM, ELBOTerms, nelbo, vdm_loss

__all__ = [
    "VDM",
    "ELBOTerms",
    "ScoreNet",
    "ElementwiseResidualMLP",
    "FixedLinearSchedule",
    "LearnedLinearSchedule",
    "SCHEDULES",
    "SAMPLERS",
    "make_schedule",
    "vdm_loss",
    "nelbo",
    "sample",
    "TrainState",
    "init_params",
    "create_train_state",
    "learning_rate_schedule",
    "make_optimizer",
    "train_step",
    "fit",
]
