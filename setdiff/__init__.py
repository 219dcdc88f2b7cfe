"""setdiff: variational diffusion models on padded sets, in JAX and Flax.

A generic library: it knows nothing of jets, files, MLflow or Hydra. The whole public API::

    net = ScoreNet(d_model=128, n_layers=4, n_heads=4, mlp_ratio=4, conditioning="adaln", n_classes=3)
    model = VDM(net, make_schedule("learned_linear"), data_dim=3, parameterization="v")
    params = init_params(model, rng, batch)                      # batch = {"x", "mask", "labels"}
    loss, terms = vdm_loss(model, params, rng, x, mask, labels)  # bits per dimension
    samples = sample(model, params, rng, mask, labels, steps=50, sampler="heun")
    bits_per_dim = nelbo(model, params, rng, x, mask, labels, n_samples=16)

References: Kingma et al. 2021, "Variational Diffusion Models", arXiv:2107.00630.

Submodules are imported on first use (PEP 562), so ``setdiff.constants`` can be read without
loading JAX (the workflow reads it every time Snakemake parses the rules).
"""

import importlib

_EXPORTS = {
    "VDM": "vdm",
    "ELBOTerms": "vdm",
    "vdm_loss": "vdm",
    "nelbo": "vdm",
    "ScoreNet": "networks",
    "ElementwiseResidualMLP": "networks",
    "FixedLinearSchedule": "schedules",
    "LearnedLinearSchedule": "schedules",
    "SCHEDULES": "schedules",
    "make_schedule": "schedules",
    "SAMPLERS": "sampling",
    "sample": "sampling",
    "TrainState": "training",
    "init_params": "training",
    "create_train_state": "training",
    "learning_rate_schedule": "training",
    "make_optimizer": "training",
    "train_step": "training",
    "fit": "training",
}
__all__ = list(_EXPORTS)


def __getattr__(name):
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)


def __dir__():
    return sorted(__all__)
