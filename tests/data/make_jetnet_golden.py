"""Writes jetnet_golden.npz: two samples of jet-like sets and what the JetNet library computes on
them for FPD, KPD and coverage/MMD, so that tests/test_metrics.py can check pipeline.metrics
against the community's reference implementation without installing it.

    pip install --target <folder> --no-deps jetnet==0.2.5 numba llvmlite
    PYTHONPATH=<folder> python tests/data/make_jetnet_golden.py

Run it from an environment with the project installed (numpy, scipy, energyflow, awkward). JetNet's
package imports PyTorch and coffea for its datasets and its jet-mass features; the functions used
here are NumPy, SciPy, numba and energyflow code, so empty stand-ins for those two packages are
put in place before the import and nothing of them is called. Under NumPy 2 JetNet's ``cov_mmd``
hands energyflow events it cannot read (see ``main``); they are handed over column-major, the
same numbers.

What is stored (JetNet 0.2.5, ``jetnet.evaluation.gen_metrics``):
  - ``real_*``, ``generated_*``: the samples (particles ``[jets, 30, (eta_rel, phi_rel, pt_rel)]``
    zero-padded, and masks);
  - ``*_features``: ``get_fpd_kpd_jet_features``, the 36 EFPs of degree <= 4;
  - ``*_scaled``: ``_normalise_features`` of the two feature sets (divided by the real maximum);
  - ``frechet_distance``: ``_calculate_frechet_distance`` of the Gaussians fitted to all scaled
    features (the quantity FPD estimates at each batch size);
  - ``polynomial_mmd_squared``: ``_mmd_poly_quadratic_unbiased`` of all scaled features (the
    quantity KPD estimates on each batch);
  - ``coverage``, ``mmd``: ``cov_mmd`` on one batch holding the first ``COV_JETS`` jets of each
    sample once, in order (its random draws replaced by ``range``).
"""

from __future__ import annotations

import sys
import types
from importlib.metadata import version
from pathlib import Path

import numpy as np

N_JETS, N_MAX = 300, 30
COV_JETS = 60  # coverage/MMD on the first 60 jets of each sample: 3 600 EMDs
OUTPUT = Path(__file__).with_name("jetnet_golden.npz")


def jet_like_sets(rng: np.random.Generator, n_jets: int, width: float, hardness: float) -> tuple[np.ndarray, np.ndarray]:
    """Sets of 5 to 30 particles: eta_rel and phi_rel about the axis with spread ``width``,
    pt_rel fractions summing to 1 (a Dirichlet draw, steeper for larger ``hardness``), sorted
    descending; padding rows are zero."""
    multiplicity = rng.integers(5, N_MAX + 1, n_jets)
    mask = np.arange(N_MAX) < multiplicity[:, None]
    particles = np.zeros((n_jets, N_MAX, 3))
    for jet, n in enumerate(multiplicity):
        pt_rel = np.sort(rng.dirichlet(np.full(n, 1.0 / hardness)))[::-1]
        angles = rng.normal(0.0, width, (n, 2)) * (1 - pt_rel[:, None]) ** 2
        particles[jet, :n] = np.column_stack([angles, pt_rel])
    return particles.astype(np.float32), mask


def import_jetnet_metrics() -> types.ModuleType:
    """``jetnet.evaluation.gen_metrics`` with empty stand-ins for torch and coffea (see above)."""

    class StandIn(types.ModuleType):
        def __getattr__(self, name):
            if name.startswith("__"):
                raise AttributeError(name)
            return sys.modules.get(f"{self.__name__}.{name}") or type(name, (), {})

    for name in ("torch", "torch.nn", "torch.nn.functional", "torch.utils", "torch.utils.data", "torch_cluster",
                 "torch_geometric", "torch_geometric.nn", "coffea", "coffea.nanoevents", "coffea.nanoevents.methods",
                 "coffea.nanoevents.methods.vector"):
        sys.modules.setdefault(name, StandIn(name))
    sys.modules["coffea.nanoevents.methods.vector"].behavior = {}  # merged into awkward's behaviours on import
    from jetnet.evaluation import gen_metrics

    return gen_metrics


class InOrder:
    """Stands in for JetNet's random generator in ``cov_mmd``: every draw is every jet, in order."""

    def choice(self, n: int, size: int) -> np.ndarray:
        assert size == n
        return np.arange(n)


def main() -> None:
    gen_metrics = import_jetnet_metrics()
    rng = np.random.default_rng(2211)
    real_particles, real_mask = jet_like_sets(rng, N_JETS, width=0.15, hardness=1.0)
    generated_particles, generated_mask = jet_like_sets(rng, N_JETS, width=0.2, hardness=1.3)

    real_features = gen_metrics.get_fpd_kpd_jet_features(real_particles, efp_jobs=1)
    generated_features = gen_metrics.get_fpd_kpd_jet_features(generated_particles, efp_jobs=1)
    real_scaled, generated_scaled = gen_metrics._normalise_features(real_features, generated_features)
    frechet = gen_metrics._calculate_frechet_distance(
        real_scaled.mean(axis=0), np.cov(real_scaled, rowvar=False),
        generated_scaled.mean(axis=0), np.cov(generated_scaled, rowvar=False),
    )
    mmd_squared = gen_metrics._mmd_poly_quadratic_unbiased(real_scaled, generated_scaled, degree=4)
    gen_metrics.rng = InOrder()
    # wasserstein 1.1 (energyflow's EMD) asks NumPy 2 for each event's pT column without a copy,
    # which the row-major events JetNet passes cannot give: the same events, column-major.
    energyflow_emds = gen_metrics.emds
    gen_metrics.emds = lambda gen_events, real_events: energyflow_emds(
        [np.asfortranarray(event, np.float64) for event in gen_events], [np.asfortranarray(event, np.float64) for event in real_events])
    coverage, mmd = gen_metrics.cov_mmd(real_particles[:COV_JETS], generated_particles[:COV_JETS],
                                        num_eval_samples=COV_JETS, num_batches=1, use_tqdm=False)

    np.savez_compressed(
        OUTPUT, jetnet_version=version("jetnet"),
        real_particles=real_particles, real_mask=real_mask,
        generated_particles=generated_particles, generated_mask=generated_mask,
        real_features=real_features, generated_features=generated_features,
        real_scaled=real_scaled, generated_scaled=generated_scaled,
        frechet_distance=frechet, polynomial_mmd_squared=mmd_squared, coverage=coverage, mmd=mmd,
    )
    print(f"{OUTPUT}: JetNet {version('jetnet')}, FD {frechet:.6g}, MMD^2 {mmd_squared:.6g}, COV {coverage:.4f}, MMD {mmd:.6g}")


if __name__ == "__main__":
    main()
