"""Jet-generation metrics, with the definitions of the JetNet library (jetnet 0.2.5).

Papers: Kansal et al. 2021, "Particle Cloud Generation with Message Passing Generative Adversarial
Networks", arXiv:2106.11535 (``w1m``, ``w1p``, ``w1efp``, coverage and MMD), and Kansal et al. 2023,
"Evaluating generative models in high energy physics", arXiv:2211.10295 (``fpd``, ``kpd``).

Every sample enters as a padded set in the sets file's layout: ``particles[n_jets, n_max, 3]`` with
features ``PARTICLE_FEATURES`` (``eta_rel``, ``phi_rel`` in radians, ``pt_rel`` as a fraction of the
jet pT) and ``mask[n_jets, n_max]`` (True for a real particle). Padded rows never enter a metric.
Angular distances between particles wrap the azimuthal difference into (-pi, pi]
(``pipeline.jets.delta_r``), as energyflow's hadronic measure does.

Batches draw jets from the ``numpy.random.Generator`` passed in, the real sample's rows first and
then the generated sample's. W1, KPD and coverage/MMD draw with replacement, as JetNet; FPD draws
without replacement, with its batch sizes capped at the smaller sample (``fpd_batch_sizes``), unlike
JetNet: its 1/N extrapolation removes the finite-batch bias only when every batch is itself an
independent sample of the distribution, which a batch drawn with replacement from a finite sample is
not. KPD leaves out the pairs of one jet drawn twice, so its repeats bias nothing
(``polynomial_mmd_squared``). Arithmetic is float64 throughout.
"""

from __future__ import annotations

import collections
import functools
import os

import energyflow
import numpy as np
import scipy.linalg
import scipy.optimize
import scipy.sparse.csgraph
import scipy.stats

from .config import PARTICLE_FEATURES
from .jets import FAR_PARTICLE_DELTA_R, PT_REL_SUM_LIMIT, delta_r, jet_from_relative_particles

# energyflow's particle coordinates (pT, rapidity, phi): our columns in that order.
ENERGYFLOW_COLUMNS = [PARTICLE_FEATURES.index(name) for name in ("pt_rel", "eta_rel", "phi_rel")]

FPD_EFP_GRAPHS = (("d<=", 4),)  # the 36 EFPs of degree at most 4 that FPD and KPD compare
W1_EFP_GRAPHS = (("n==", 4), ("d==", 4), ("p==", 1))  # the 5 EFPs that w1efp compares

KPD_KERNEL_DEGREE = 4
KPD_ERROR_PERCENTILES = (16.275, 83.725)  # half this range is the KPD error (one sigma for a normal)
FRECHET_SQRTM_OFFSET = 1e-6  # added to the covariance diagonals when sqrtm of their product fails
EMD_RADIUS = 1.0  # R and beta of the EMD, the defaults of JetNet's cov_mmd
EMD_ANGULAR_EXPONENT = 1.0


# ---------------------------------------------------------------------------------------------
# Input checks


def _checked_sample(particles, mask, side: str) -> tuple[np.ndarray, np.ndarray]:
    """``(particles, mask)`` as float64 and bool, with the padded rows set to zero."""
    particles = np.asarray(particles, dtype=np.float64)
    mask = np.asarray(mask, dtype=bool)
    if particles.ndim != 3 or particles.shape[-1] != len(PARTICLE_FEATURES):
        raise ValueError(
            f"the {side} particles have shape {particles.shape}, not [n_jets, n_max, {len(PARTICLE_FEATURES)}] "
            f"with features {', '.join(PARTICLE_FEATURES)}; pass the sets file's `particles` array."
        )
    if mask.shape != particles.shape[:2]:
        raise ValueError(
            f"the {side} mask has shape {mask.shape} but its particles have {particles.shape[:2]} rows; "
            "pass the `mask` array of the same sets file."
        )
    if particles.shape[0] == 0:
        raise ValueError(f"the {side} sample has no jets; evaluate a sets file that holds some.")
    if not mask.any():
        raise ValueError(f"the {side} sample has no valid particles (its mask is all False); the sample is empty, make it again.")
    if not np.isfinite(particles[mask]).all():
        raise ValueError(f"the {side} particles contain NaN or infinite values; the sample is broken, make it again.")
    return np.where(mask[..., None], particles, 0.0), mask


def _checked_features(values, side: str) -> np.ndarray:
    """``values`` as a float64 ``[n_rows, n_columns]`` array (1-D input is one column)."""
    values = np.asarray(values, dtype=np.float64)
    if values.ndim == 1:
        values = values[:, None]
    if values.ndim != 2:
        raise ValueError(f"the {side} values have shape {values.shape}, not [n_jets, n_features]; pass one row per jet.")
    if values.shape[0] == 0:
        raise ValueError(f"the {side} sample has no jets; evaluate a sets file that holds some.")
    if not np.isfinite(values).all():
        raise ValueError(f"the {side} values contain NaN or infinite values; the sample is broken, make it again.")
    return values


def _checked_pair(real_values, generated_values) -> tuple[np.ndarray, np.ndarray]:
    real_values = _checked_features(real_values, "real")
    generated_values = _checked_features(generated_values, "generated")
    if real_values.shape[1] != generated_values.shape[1]:
        raise ValueError(
            f"the real values have {real_values.shape[1]} columns and the generated {generated_values.shape[1]}; "
            "compute the same features for both samples."
        )
    return real_values, generated_values


def _require_at_least(name: str, value: int, minimum: int) -> None:
    if value < minimum:
        raise ValueError(f"{name}={value} is too small; set it to at least {minimum}.")


def _worker_count(n_jobs: int) -> int:
    """``n_jobs`` workers, or one per CPU core for 0."""
    _require_at_least("n_jobs", n_jobs, 0)
    return n_jobs or os.cpu_count() or 1


def _bootstrap_rows(rng: np.random.Generator, n_real: int, n_generated: int, n_per_batch: int, n_batches: int):
    """For each batch, ``(real_rows, generated_rows)``: ``n_per_batch`` row indices drawn with
    replacement from each sample, the real sample's first."""
    for _ in range(n_batches):
        yield rng.integers(n_real, size=n_per_batch), rng.integers(n_generated, size=n_per_batch)


def _subsample_rows(rng: np.random.Generator, n_real: int, n_generated: int, n_per_batch: int, n_batches: int):
    """For each batch, ``(real_rows, generated_rows)``: ``n_per_batch`` distinct row indices of each
    sample (drawn without replacement, so at most the smaller sample's size), the real sample's first."""
    for _ in range(n_batches):
        yield rng.choice(n_real, size=n_per_batch, replace=False), rng.choice(n_generated, size=n_per_batch, replace=False)


# ---------------------------------------------------------------------------------------------
# Jet observables


def _energyflow_events(particles: np.ndarray, mask: np.ndarray) -> list[np.ndarray]:
    """Each jet's real particles as an energyflow event ``[n_particles, (pt, eta, phi)]``. Column-major,
    because wasserstein 1.1.0 (energyflow's EMD) asks NumPy 2 for the pT column without a copy, which
    a row-major array cannot give."""
    return [np.asfortranarray(jet[jet_mask][:, ENERGYFLOW_COLUMNS]) for jet, jet_mask in zip(particles, mask)]


def relative_jet_mass(particles, mask) -> np.ndarray:
    """Jet mass over jet pT, ``m / pT_jet`` (dimensionless), per jet, from the massless sum of its real
    particles (``pipeline.jets.jet_from_relative_particles``): the mass that ``w1m`` compares
    (Kansal et al. 2021, arXiv:2106.11535)."""
    return _relative_jet_mass(*_checked_sample(particles, mask, "given"))


def _relative_jet_mass(particles: np.ndarray, mask: np.ndarray) -> np.ndarray:
    eta_rel, phi_rel, pt_rel = (particles[..., PARTICLE_FEATURES.index(name)] for name in ("eta_rel", "phi_rel", "pt_rel"))
    return jet_from_relative_particles(eta_rel, phi_rel, pt_rel, mask)["mass"]


@functools.lru_cache
def _efp_set(efpset_args: tuple) -> energyflow.EFPSet:
    """EFPs with the hadronic measure, beta = 1, not normalised, as JetNet computes them (built
    once per selection: energyflow reads its whole graph file each time, 0.7 s on a 2-core CPU)."""
    return energyflow.EFPSet(*efpset_args, measure="hadr", beta=1, normed=None, coords="ptyphim")


def _connected_components(n_vertices: int, edges) -> list[tuple[int, tuple[tuple[int, int], ...]]]:
    """The connected components of a multigraph, each as ``(n_vertices, edges)`` renumbered from 0."""
    adjacency = np.zeros((n_vertices, n_vertices), bool)
    for first, second in edges:
        adjacency[first, second] = adjacency[second, first] = True
    _, component_of = scipy.sparse.csgraph.connected_components(adjacency, directed=False)
    components = []
    for component in range(component_of.max() + 1):
        renumber = {vertex: index for index, vertex in enumerate(np.flatnonzero(component_of == component))}
        inside = tuple(sorted((renumber[a], renumber[b]) for a, b in edges if a in renumber))
        components.append((len(renumber), inside))
    return components


def _graph_einsum(n_vertices: int, edges) -> tuple[str, list[int]]:
    """The ``np.einsum`` subscripts of one connected EFP over a batch ``b`` of jets,
    ``sum_{i_1..i_N} z_{i_1}..z_{i_N} prod_{(k,l)} theta_{i_k i_l}`` (an edge repeated m times enters
    as ``theta^m``), and the power of ``theta`` of each edge operand."""
    names = "acdefghijk"  # one index per vertex (never "b")
    multiplicity = collections.Counter(edges)
    operands = [f"b{names[vertex]}" for vertex in range(n_vertices)]
    operands += [f"b{names[first]}{names[second]}" for first, second in multiplicity]
    return ",".join(operands) + "->b", list(multiplicity.values())


def _efp_chunk(particles: np.ndarray, mask: np.ndarray, connected, factors) -> np.ndarray:
    """EFPs of a chunk of padded jets: ``z_i = pt_rel_i`` (0 on padding), ``theta_ij`` the eta-phi
    distance with the azimuthal difference wrapped (``delta_r``); each connected graph once, then
    every EFP as the product of its components."""
    eta, phi, pt = (particles[..., PARTICLE_FEATURES.index(name)] for name in ("eta_rel", "phi_rel", "pt_rel"))
    z = np.where(mask, pt, 0.0)
    theta = delta_r(eta[:, :, None], phi[:, :, None], eta[:, None, :], phi[:, None, :])
    theta_powers = {1: theta}
    values = []
    for subscripts, n_vertices, powers in connected:
        for power in powers:
            if power not in theta_powers:
                theta_powers[power] = theta**power
        values.append(np.einsum(subscripts, *([z] * n_vertices), *(theta_powers[power] for power in powers), optimize=True))
    return np.stack([np.prod([values[index] for index in indices], axis=0) for indices in factors], axis=1)


def energy_flow_polynomials(particles, mask, efpset_args=FPD_EFP_GRAPHS, chunk_elements: int = 2**22) -> np.ndarray:
    """Energy flow polynomials (Komiske, Metodiev, Thaler 2018, arXiv:1712.07124, eq. 2.7) per jet,
    ``[n_jets, n_efps]``, of the graphs ``efpset_args`` selects (a tuple of ``energyflow.EFPSet`` arguments; the
    default gives the 36 EFPs of degree at most 4 that FPD and KPD use, arXiv:2211.10295).

    Hadronic measure with beta = 1, unnormalised, as JetNet: an EFP with n vertices and d edges is
    a sum over n-tuples of particles of the product of their ``pt_rel`` (fractions of the jet pT)
    and of the d eta-phi distances its edges name (radians, the azimuthal difference wrapped into
    (-pi, pi] as energyflow's measure wraps it; the two agree for any ``phi_rel`` within
    [-3 pi / 2, 3 pi / 2], beyond which energyflow's formula is no longer periodic); padded rows
    have no pT, so only real particles enter. The graphs and their order are energyflow's
    ``EFPSet``'s; the values are computed here on whole batches of padded jets with ``np.einsum``
    (each connected graph once, a disconnected EFP as the product of its components), equal to
    ``EFPSet.batch_compute`` to rounding and several times faster. Jets go
    ``chunk_elements / n_max^2`` at a time.
    """
    particles, mask = _checked_sample(particles, mask, "given")
    efp_set = _efp_set(efpset_args)
    connected_index: dict = {}
    factors = []  # per EFP: the indices of its connected components
    for edges, n_vertices in zip(efp_set.graphs(), efp_set.specs[:, 0]):
        components = _connected_components(int(n_vertices), [tuple(edge) for edge in edges])
        factors.append([connected_index.setdefault(component, len(connected_index)) for component in components])
    connected = []  # per connected graph: its einsum, vertex count and edge powers
    for n_vertices, edges in connected_index:
        subscripts, powers = _graph_einsum(n_vertices, edges)
        connected.append((subscripts, n_vertices, powers))
    chunk = max(1, chunk_elements // particles.shape[1] ** 2)
    return np.concatenate([
        _efp_chunk(particles[start : start + chunk], mask[start : start + chunk], connected, factors)
        for start in range(0, len(particles), chunk)
    ]) if len(particles) else np.zeros((0, len(factors)))


def w1efp_columns() -> np.ndarray:
    """Indices of the ``W1_EFP_GRAPHS`` EFPs among the columns ``energy_flow_polynomials`` returns
    for ``FPD_EFP_GRAPHS``, so that one EFP computation serves FPD, KPD and ``w1efp``."""
    return np.flatnonzero(_efp_set(FPD_EFP_GRAPHS).sel(*W1_EFP_GRAPHS))


# ---------------------------------------------------------------------------------------------
# Wasserstein-1 distances (Kansal et al. 2021, arXiv:2106.11535, sec. 5)


class _WeightedW1:
    """W1 between two samples of one variable whose values carry integer weights that change from
    batch to batch: the values are sorted once, each batch only sums weights.

    ``W1 = integral |F_real(x) - F_generated(x)| dx`` over the merged sorted values, with the
    weighted empirical CDFs (the formula of ``scipy.stats.wasserstein_distance``). A bootstrap batch
    that draws a jet k times gives each of its values weight k, so this is W1 of the drawn values
    themselves, without sorting millions of repeated values for every batch.
    """

    def __init__(self, real_values: np.ndarray, generated_values: np.ndarray):
        self.real_order, self.generated_order = np.argsort(real_values), np.argsort(generated_values)
        merged = np.sort(np.concatenate([real_values, generated_values]))
        self.widths = np.diff(merged)
        # F(x) on each interval [merged[i], merged[i + 1]) counts the values <= merged[i]
        self.real_counted = np.searchsorted(real_values[self.real_order], merged[:-1], side="right")
        self.generated_counted = np.searchsorted(generated_values[self.generated_order], merged[:-1], side="right")

    @staticmethod
    def _cdf(weights_in_order: np.ndarray, counted: np.ndarray) -> np.ndarray:
        cumulative = np.concatenate([[0.0], np.cumsum(weights_in_order, dtype=np.float64)])
        return cumulative[counted] / cumulative[-1]

    def __call__(self, real_weights: np.ndarray, generated_weights: np.ndarray) -> float:
        real_cdf = self._cdf(real_weights[self.real_order], self.real_counted)
        generated_cdf = self._cdf(generated_weights[self.generated_order], self.generated_counted)
        return float(np.sum(np.abs(real_cdf - generated_cdf) * self.widths))


def _bootstrap_w1_of_jets(real_values: np.ndarray, real_jet: np.ndarray, n_real_jets: int, generated_values: np.ndarray,
                          generated_jet: np.ndarray, n_generated_jets: int, n_batches: int, n_per_batch: int,
                          rng: np.random.Generator) -> np.ndarray:
    """``[n_batches, k]`` W1 distances per column of ``values [n, k]`` whose rows belong to jets
    (``*_jet[n]``): each batch draws ``n_per_batch`` jets with replacement from each side
    (``_bootstrap_rows``) and compares the rows of the drawn jets, a jet drawn twice counting twice."""
    _require_at_least("n_batches", n_batches, 1)
    _require_at_least("n_per_batch", n_per_batch, 1)
    columns = [_WeightedW1(real_values[:, column], generated_values[:, column]) for column in range(real_values.shape[1])]
    distances = []
    for real_rows, generated_rows in _bootstrap_rows(rng, n_real_jets, n_generated_jets, n_per_batch, n_batches):
        real_weights = np.bincount(real_rows, minlength=n_real_jets)[real_jet]
        generated_weights = np.bincount(generated_rows, minlength=n_generated_jets)[generated_jet]
        if not (real_weights.any() and generated_weights.any()):
            raise ValueError("a bootstrap batch drew only jets without particles; draw more jets per batch (n_per_batch).")
        distances.append([column(real_weights, generated_weights) for column in columns])
    return np.array(distances)


def bootstrap_w1(real_values, generated_values, n_batches: int, n_per_batch: int, rng: np.random.Generator
                 ) -> tuple[np.ndarray, np.ndarray]:
    """Wasserstein-1 distance per column between ``real_values [n_real, k]`` and ``generated_values
    [n_gen, k]`` (1-D for k = 1), in the columns' own units, over ``n_batches`` bootstrap batches of
    ``n_per_batch`` rows drawn with replacement from each side, as JetNet. Returns the mean and the
    standard deviation (ddof 0) over batches, each ``[k]``."""
    real_values, generated_values = _checked_pair(real_values, generated_values)
    n_real, n_generated = len(real_values), len(generated_values)
    distances = _bootstrap_w1_of_jets(real_values, np.arange(n_real), n_real, generated_values, np.arange(n_generated),
                                      n_generated, n_batches, n_per_batch, rng)
    return distances.mean(axis=0), distances.std(axis=0)


def w1m(real_particles, real_mask, gen_particles, gen_mask, n_batches: int, n_per_batch: int, rng: np.random.Generator
        ) -> tuple[float, float]:
    """W1 distance between the relative jet masses ``m / pT_jet`` (dimensionless) of the real and
    generated jets: bootstrap mean and standard deviation (``bootstrap_w1``)."""
    real_mass = _relative_jet_mass(*_checked_sample(real_particles, real_mask, "real"))
    generated_mass = _relative_jet_mass(*_checked_sample(gen_particles, gen_mask, "generated"))
    mean, std = bootstrap_w1(real_mass, generated_mass, n_batches, n_per_batch, rng)
    return float(mean[0]), float(std[0])


def w1p(real_particles, real_mask, gen_particles, gen_mask, n_batches: int, n_per_batch: int, rng: np.random.Generator
        ) -> tuple[np.ndarray, np.ndarray]:
    """W1 distance per particle feature (``PARTICLE_FEATURES``: radians, radians, fraction of jet
    pT). Each batch draws ``n_per_batch`` jets with replacement from each side and compares the
    real particles of those jets. Returns the mean and standard deviation (ddof 0) over batches,
    each ``[3]``."""
    real_particles, real_mask = _checked_sample(real_particles, real_mask, "real")
    gen_particles, gen_mask = _checked_sample(gen_particles, gen_mask, "generated")
    distances = _bootstrap_w1_of_jets(
        real_particles[real_mask], np.nonzero(real_mask)[0], len(real_mask),
        gen_particles[gen_mask], np.nonzero(gen_mask)[0], len(gen_mask), n_batches, n_per_batch, rng,
    )
    return distances.mean(axis=0), distances.std(axis=0)


def w1efp(real_efps, gen_efps, n_batches: int, n_per_batch: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """W1 distance per EFP between real and generated jets, on the 5 ``W1_EFP_GRAPHS`` EFPs (the
    ``w1efp_columns()`` of ``energy_flow_polynomials``; units: fraction of jet pT to the power 4
    times radians to the power 4). Returns the bootstrap mean and standard deviation, each ``[5]``."""
    return bootstrap_w1(real_efps, gen_efps, n_batches, n_per_batch, rng)


# ---------------------------------------------------------------------------------------------
# Frechet and kernel physics distances (Kansal et al. 2023, arXiv:2211.10295)


def frechet_distance(mean_a, cov_a, mean_b, cov_b) -> float:
    """Frechet (Wasserstein-2 squared) distance between two Gaussians, as in FID (Heusel et al.
    2017, arXiv:1706.08500): ``|mu_a - mu_b|^2 + Tr(C_a + C_b - 2 sqrt(C_a C_b))``, in the squared
    units of the features. The matrix square root is scipy's; when it is not finite it is taken
    again with ``FRECHET_SQRTM_OFFSET`` added to both diagonals; its real part enters."""
    mean_a, mean_b = np.atleast_1d(np.asarray(mean_a, np.float64)), np.atleast_1d(np.asarray(mean_b, np.float64))
    cov_a, cov_b = np.atleast_2d(np.asarray(cov_a, np.float64)), np.atleast_2d(np.asarray(cov_b, np.float64))
    sqrt_product = scipy.linalg.sqrtm(cov_a @ cov_b)
    if not np.isfinite(sqrt_product).all():
        offset = FRECHET_SQRTM_OFFSET * np.eye(len(cov_a))
        sqrt_product = scipy.linalg.sqrtm((cov_a + offset) @ (cov_b + offset))
    mean_difference = mean_a - mean_b
    return float(mean_difference @ mean_difference + np.trace(cov_a) + np.trace(cov_b) - 2 * np.trace(sqrt_product.real))


def scale_by_real_maximum(real_features, gen_features) -> tuple[np.ndarray, np.ndarray]:
    """Both samples divided, per column, by the largest absolute value of the real sample (columns
    whose real maximum is 0 are left as they are), as arXiv:2211.10295 does before FPD and KPD."""
    real_features, gen_features = _checked_pair(real_features, gen_features)
    real_maximum = np.abs(real_features).max(axis=0)
    scale = np.where(real_maximum > 0, real_maximum, 1.0)
    return real_features / scale, gen_features / scale


def fpd_batch_sizes(n_real: int, n_generated: int, min_jets: int = 20_000, max_jets: int = 50_000, n_points: int = 10
                    ) -> np.ndarray:
    """The batch sizes N, ascending, at which ``fpd`` measures the Frechet distance between samples of
    ``n_real`` and ``n_generated`` jets: ``n_points`` sizes evenly spaced in 1/N from ``1/min_jets`` to
    ``1/max_jets`` (arXiv:2211.10295; JetNet's defaults 20 000 and 50 000), rounded.

    Batches are drawn without replacement, so none can hold more jets than the smaller sample: when
    ``max_jets`` exceeds it, both ends are scaled by the same factor, so that the largest batch is the
    whole smaller sample and the range keeps its ratio ``min_jets / max_jets`` (its lever arm in 1/N).
    """
    _require_at_least("min_jets", min_jets, 2)
    _require_at_least("max_jets", max_jets, min_jets + 1)
    _require_at_least("n_points", n_points, 3)
    smaller_sample = min(n_real, n_generated)
    scale = min(1.0, smaller_sample / max_jets)
    sizes = np.rint(1 / np.linspace(1 / (min_jets * scale), 1 / (max_jets * scale), n_points)).astype(int)
    if sizes[0] < 2 or sizes[0] == sizes[-1]:
        raise ValueError(
            f"the smaller sample has {smaller_sample} jets, too few for FPD batches from {min_jets} to {max_jets} jets "
            f"scaled down to it ({sizes[0]} to {sizes[-1]}: the 1/N fit needs at least 2 jets and two different sizes); "
            "score samples with more jets."
        )
    return sizes


def fpd(real_features, gen_features, *, min_jets: int = 20_000, max_jets: int = 50_000, n_points: int = 10,
        n_batches: int = 20, rng: np.random.Generator) -> tuple[float, float]:
    """Frechet physics distance (arXiv:2211.10295): the Frechet distance between Gaussians fitted
    to real and generated jet features (rows are jets; typically the 36 EFPs of ``FPD_EFP_GRAPHS``),
    extrapolated to infinitely many jets. Dimensionless: features are first divided by the real
    sample's maximum (``scale_by_real_maximum``).

    At each batch size N of ``fpd_batch_sizes`` (``min_jets`` to ``max_jets``, capped at the smaller
    sample) the distance is averaged over ``n_batches`` batches of N jets drawn without replacement
    from each side. A least-squares fit ``FD(N) = intercept + slope / N`` with both coefficients >= 0
    gives ``(intercept, its standard error)``.

    Without replacement, each batch is an independent sample of N jets of its distribution, so the
    mean FD(N) follows the finite-sample bias of N jets and the intercept extrapolates it away.
    JetNet draws with replacement; a batch so drawn also carries the fluctuation of the finite
    sample it is drawn from, a bias of order 1/(jets in each sample) that no batch size removes.
    The error is the fit's: it counts the scatter of the batch means about the line, not the
    fluctuation of the two samples themselves, which all batches share, so it understates how much
    the FPD of other samples of the same distributions would differ.
    """
    real_features, gen_features = scale_by_real_maximum(real_features, gen_features)
    batch_sizes = fpd_batch_sizes(len(real_features), len(gen_features), min_jets, max_jets, n_points)
    _require_at_least("n_batches", n_batches, 1)
    mean_distances = []
    for batch_size in batch_sizes:
        distances = []
        for real_rows, generated_rows in _subsample_rows(rng, len(real_features), len(gen_features), batch_size, n_batches):
            real_batch, generated_batch = real_features[real_rows], gen_features[generated_rows]
            distances.append(frechet_distance(
                real_batch.mean(axis=0), np.cov(real_batch, rowvar=False),
                generated_batch.mean(axis=0), np.cov(generated_batch, rowvar=False),
            ))
        mean_distances.append(np.mean(distances))
    design = np.stack([np.ones(len(batch_sizes)), 1 / np.asarray(batch_sizes, np.float64)], axis=1)
    mean_distances = np.asarray(mean_distances, np.float64)
    # Non-negative linear least squares: exact at any scale (an iterative fit started at 1 stays
    # there when the distances are ~1e20, and would report an FPD of 1).
    (intercept, slope), _ = scipy.optimize.nnls(design, mean_distances)
    residual_variance = np.sum(np.square(mean_distances - design @ [intercept, slope])) / max(len(batch_sizes) - 2, 1)
    covariance = residual_variance * np.linalg.pinv(design.T @ design)
    return float(intercept), float(np.sqrt(covariance[0, 0]))


def polynomial_mmd_squared(x, y, x_counts=None, y_counts=None) -> float:
    """Unbiased (quadratic-time) estimate of the squared maximum mean discrepancy between the
    samples ``x [n, d]`` and ``y [m, d]`` with the polynomial kernel ``k(a, b) = (a.b / d + 1)^4``
    (Binkowski et al. 2018, arXiv:1801.01401; KPD of arXiv:2211.10295): the mean of
    ``k(x_i, x_j)`` over pairs of different jets plus that of ``k(y_i, y_j)`` minus twice the mean
    ``k(x_i, y_j)``. In the squared units of the kernel (dimensionless for max-scaled features).

    ``x_counts[n]`` and ``y_counts[m]`` (default: all 1) say how many times each row was drawn: the
    value is that of the batch of all draws, its pairs of one jet drawn twice left out like the
    diagonal, for ``k(x, x)`` of a repeated jet is no draw of ``k(x, x')`` and would bias the
    estimate upwards by about ``(E k(x, x) - E k(x, x')) / n`` per side.
    """
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    x_counts = np.ones(len(x)) if x_counts is None else np.asarray(x_counts, np.float64)
    y_counts = np.ones(len(y)) if y_counts is None else np.asarray(y_counts, np.float64)
    n_features = x.shape[1]

    def kernel(a, b):
        gram = a @ b.T
        gram /= n_features
        gram += 1
        return np.power(gram, KPD_KERNEL_DEGREE, out=gram)

    def mean_over_pairs_of_different_jets(samples, counts):
        kernel_matrix = kernel(samples, samples)
        same_jet_pairs = counts**2
        total = counts @ kernel_matrix @ counts - same_jet_pairs @ np.diag(kernel_matrix)
        return total / (counts.sum() ** 2 - same_jet_pairs.sum())

    across = x_counts @ kernel(x, y) @ y_counts / (x_counts.sum() * y_counts.sum())
    return float(mean_over_pairs_of_different_jets(x, x_counts) + mean_over_pairs_of_different_jets(y, y_counts) - 2 * across)


def kpd(real_features, gen_features, *, n_batches: int = 10, n_per_batch: int = 5_000, rng: np.random.Generator
        ) -> tuple[float, float]:
    """Kernel physics distance (arXiv:2211.10295): ``polynomial_mmd_squared`` between batches of
    ``n_per_batch`` jets drawn with replacement from each side, as JetNet, on features divided by the
    real sample's maximum (dimensionless). Pairs of one jet drawn twice are left out, so the estimate
    stays unbiased however many jets repeat (a batch may be larger than its sample). Returns the
    median over ``n_batches`` batches and half the ``KPD_ERROR_PERCENTILES`` range as its error."""
    real_features, gen_features = scale_by_real_maximum(real_features, gen_features)
    _require_at_least("n_batches", n_batches, 1)
    _require_at_least("n_per_batch", n_per_batch, 2)
    values = []
    for real_rows, generated_rows in _bootstrap_rows(rng, len(real_features), len(gen_features), n_per_batch, n_batches):
        (real_jets, real_counts), (generated_jets, generated_counts) = (
            np.unique(rows, return_counts=True) for rows in (real_rows, generated_rows)
        )
        if len(real_jets) < 2 or len(generated_jets) < 2:
            raise ValueError(
                f"a KPD batch drew a single distinct jet of a sample ({len(real_features)} real, {len(gen_features)} generated "
                "jets): the MMD needs pairs of different jets; draw more jets per batch (n_per_batch) or score larger samples."
            )
        values.append(polynomial_mmd_squared(real_features[real_jets], gen_features[generated_jets], real_counts, generated_counts))
    return float(np.median(values)), float(scipy.stats.iqr(values, rng=KPD_ERROR_PERCENTILES) / 2)


# ---------------------------------------------------------------------------------------------
# Energy mover's distance, coverage and MMD (Kansal et al. 2021, arXiv:2106.11535, sec. 5)


def _pairwise_emd(gen_events: list[np.ndarray], real_events: list[np.ndarray], n_jobs: int) -> np.ndarray:
    return energyflow.emd.emds(gen_events, real_events, R=EMD_RADIUS, beta=EMD_ANGULAR_EXPONENT, norm=False,
                               n_jobs=_worker_count(n_jobs))


def emd_matrix(gen_particles, gen_mask, real_particles, real_mask, n_jobs: int = 0) -> np.ndarray:
    """Energy mover's distance (Komiske, Metodiev, Thaler 2019, arXiv:1902.02346) between every
    generated and every real jet, ``[n_gen, n_real]``, with R = 1, beta = 1 and unnormalised pT, as
    JetNet's ``cov_mmd``: in units of (fraction of jet pT) x (eta-phi distance). ``n_jobs`` threads
    (0: one per CPU core)."""
    gen_events = _energyflow_events(*_checked_sample(gen_particles, gen_mask, "generated"))
    real_events = _energyflow_events(*_checked_sample(real_particles, real_mask, "real"))
    return _pairwise_emd(gen_events, real_events, n_jobs)


def coverage_and_mmd(distances) -> tuple[float, float]:
    """Coverage and MMD of one batch from its ``[n_gen, n_real]`` distance matrix (arXiv:2106.11535,
    sec. 5): coverage is the number of distinct real jets that are the nearest real jet of some
    generated jet, over the number of real jets (a fraction); MMD is the mean over real jets of the
    distance to the nearest generated jet (in the distances' units)."""
    distances = np.asarray(distances, np.float64)
    coverage = len(np.unique(distances.argmin(axis=1))) / distances.shape[1]
    return coverage, float(distances.min(axis=0).mean())


def cov_mmd(real_particles, real_mask, gen_particles, gen_mask, *, n_per_batch: int = 100, n_batches: int = 10,
            rng: np.random.Generator, n_jobs: int = 0) -> dict[str, float]:
    """Coverage and minimum matching distance (arXiv:2106.11535, sec. 5) on the EMD
    (``emd_matrix``): each batch draws ``n_per_batch`` jets with replacement from each side and
    scores them with ``coverage_and_mmd``. Returns the means and standard deviations (ddof 0) over
    batches: ``cov`` (a fraction) and ``mmd`` (EMD units)."""
    real_events = _energyflow_events(*_checked_sample(real_particles, real_mask, "real"))
    gen_events = _energyflow_events(*_checked_sample(gen_particles, gen_mask, "generated"))
    _require_at_least("n_batches", n_batches, 1)
    _require_at_least("n_per_batch", n_per_batch, 1)
    scores = np.array([
        coverage_and_mmd(_pairwise_emd([gen_events[row] for row in generated_rows],
                                       [real_events[row] for row in real_rows], n_jobs))
        for real_rows, generated_rows in _bootstrap_rows(rng, len(real_events), len(gen_events), n_per_batch, n_batches)
    ])
    (cov, mmd), (cov_std, mmd_std) = scores.mean(axis=0), scores.std(axis=0)
    return {"cov": float(cov), "cov_std": float(cov_std), "mmd": float(mmd), "mmd_std": float(mmd_std)}


def unphysical_fractions(particles, mask) -> dict[str, float]:
    """``far_particles``: the fraction of real particles farther than ``FAR_PARTICLE_DELTA_R`` from the
    jet axis (``delta_r`` of (eta_rel, phi_rel), phi wrapped); ``pt_rel_sum_over``: the fraction of
    jets whose momentum fractions add up to more than ``PT_REL_SUM_LIMIT``. Real jets score ~0 on both."""
    particles, mask = _checked_sample(particles, mask, "sample")
    distance = delta_r(particles[..., 0], particles[..., 1], 0.0, 0.0)
    pt_rel_sum = np.sum(np.where(mask, particles[..., 2], 0.0), axis=1)
    return {
        "far_particles": float(np.sum((distance > FAR_PARTICLE_DELTA_R) & mask) / max(int(mask.sum()), 1)),
        "pt_rel_sum_over": float(np.mean(pt_rel_sum > PT_REL_SUM_LIMIT)),
    }
