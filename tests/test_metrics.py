"""Jet-generation metrics: analytic values, invariances, agreement with energyflow, refusal of bad input."""

from pathlib import Path

import energyflow
import numpy as np
import pytest

import pipeline.metrics
from pipeline.jets import wrap_phi
from pipeline.metrics import (
    W1_EFP_GRAPHS,
    bootstrap_w1,
    cov_mmd,
    coverage_and_mmd,
    emd_matrix,
    energy_flow_polynomials,
    fpd,
    fpd_batch_sizes,
    frechet_distance,
    kpd,
    polynomial_mmd_squared,
    relative_jet_mass,
    scale_by_real_maximum,
    w1efp,
    w1efp_columns,
    w1m,
    w1p,
)

ETA, PHI, PT = 0, 1, 2  # the sets file's feature order


def random_jets(seed, n_jets, n_max=10, eta_width=0.1, phi_width=0.2):
    """Padded jets with 2..n_max particles, pt_rel summing to 1 and sorted decreasing, padded rows 0."""
    rng = np.random.default_rng(seed)
    mask = np.arange(n_max) < rng.integers(2, n_max + 1, size=n_jets)[:, None]
    pt_rel = -np.sort(-rng.exponential(size=(n_jets, n_max)) * mask, axis=1)
    pt_rel /= pt_rel.sum(axis=1, keepdims=True)
    particles = np.stack([rng.normal(0, eta_width, mask.shape), rng.normal(0, phi_width, mask.shape), pt_rel], axis=-1)
    return particles * mask[..., None], mask


def with_garbage_padding(particles, mask):
    return np.where(mask[..., None], particles, 1e6)


def single_jet(rows, n_max=4):
    """One jet whose real particles are ``rows`` of (eta_rel, phi_rel, pt_rel), padded to ``n_max``."""
    particles = np.zeros((1, n_max, 3))
    particles[0, :len(rows)] = rows
    return particles, np.arange(n_max)[None, :] < len(rows)


# ---------------------------------------------------------------------------------------------
# W1 distances


def test_identical_single_jet_samples_give_exactly_zero_w1():
    """Copies of one jet on both sides: every batch holds the same values on each side."""
    particles, mask = random_jets(0, 1)
    copies, copies_mask = np.repeat(particles, 50, axis=0), np.repeat(mask, 50, axis=0)
    rng = np.random.default_rng(1)
    assert w1m(copies, copies_mask, copies, copies_mask, 3, 40, rng) == (0.0, 0.0)
    means, stds = w1p(copies, copies_mask, copies, copies_mask, 3, 40, rng)
    np.testing.assert_array_equal(means, 0.0)
    np.testing.assert_array_equal(stds, 0.0)
    efps = energy_flow_polynomials(copies, copies_mask)[:, w1efp_columns()]
    np.testing.assert_array_equal(w1efp(efps, efps, 3, 40, rng)[0], 0.0)


def test_identical_varied_samples_give_w1_within_bootstrap_noise():
    """Same jets on both sides: W1 only from the two bootstrap draws, of order std / sqrt(jets drawn).
    Mixing up features (eta and phi have different widths) or masses would exceed the bound."""
    particles, mask = random_jets(2, 3_000)
    n_per_batch = 3_000
    mass = relative_jet_mass(particles, mask)
    mass_w1, _ = w1m(particles, mask, particles, mask, 2, n_per_batch, np.random.default_rng(3))
    assert mass_w1 < 4 * mass.std() / np.sqrt(n_per_batch)
    particle_w1, _ = w1p(particles, mask, particles, mask, 2, n_per_batch, np.random.default_rng(4))
    assert np.all(particle_w1 < 4 * particles[mask].std(axis=0) / np.sqrt(n_per_batch))


def test_shifting_generated_pt_rel_shifts_w1p_by_exactly_the_shift():
    """Generated pt_rel all above the real ones: W1 is the difference of the means, so adding c to
    every generated pt_rel adds exactly c (same seed: the same jets are drawn)."""
    real, real_mask = random_jets(5, 200)
    generated, generated_mask = random_jets(6, 300)
    real[..., PT] = np.where(real_mask, 0.05 + 0.4 * real[..., PT], 0.0)
    generated[..., PT] = np.where(generated_mask, 0.55 + 0.4 * generated[..., PT], 0.0)
    shift = 0.3
    shifted = generated.copy()
    shifted[..., PT] += shift * generated_mask
    before, _ = w1p(real, real_mask, generated, generated_mask, 4, 100, np.random.default_rng(7))
    after, after_std = w1p(real, real_mask, shifted, generated_mask, 4, 100, np.random.default_rng(7))
    assert after[PT] - before[PT] == pytest.approx(shift, abs=1e-12)
    np.testing.assert_array_equal(after[[ETA, PHI]], before[[ETA, PHI]])
    assert after_std[PT] > 0  # the batches differ, and the shift survives in each of them


def test_bootstrap_w1_matches_analytic_distances():
    """N(0,1) vs N(0.7,1): W1 = 0.7; U(0,1) vs U(0,2): W1 = integral of q over [0,1] = 0.5."""
    rng = np.random.default_rng(8)
    n = 20_000
    means, stds = bootstrap_w1(rng.normal(0, 1, n), rng.normal(0.7, 1, n), 2, n, rng)
    assert means.shape == stds.shape == (1,)
    assert means[0] == pytest.approx(0.7, abs=0.03)
    means, _ = bootstrap_w1(
        np.stack([rng.uniform(0, 1, n), np.zeros(n)], axis=1),
        np.stack([rng.uniform(0, 2, n), np.full(n, 2.5)], axis=1), 2, n, rng,
    )
    np.testing.assert_allclose(means, [0.5, 2.5], atol=0.03)


def test_w1p_of_single_jets_matches_a_hand_computation():
    """One jet per side, so every batch holds copies of its particles. By hand, from the step CDFs:
    eta {-0.1, 0, 0.1} vs {0, 0.1}: 0.1/3 + 0.1/6 = 0.05; phi {0, 1, 2} vs {0, 2}: 1/6 + 1/6 = 1/3;
    pt {0.5, 0.3, 0.2} vs {0.6, 0.4}: (2 + 4 + 1 + 3) / 60 = 1/6."""
    real, real_mask = single_jet([[-0.1, 0.0, 0.5], [0.0, 1.0, 0.3], [0.1, 2.0, 0.2]])
    generated, generated_mask = single_jet([[0.0, 0.0, 0.6], [0.1, 2.0, 0.4]])
    means, stds = w1p(real, real_mask, generated, generated_mask, 2, 5, np.random.default_rng(9))
    np.testing.assert_allclose(means, [0.05, 1 / 3, 1 / 6], rtol=1e-12)
    np.testing.assert_allclose(stds, 0.0, atol=1e-15)


def test_relative_jet_mass_of_two_particles_at_opposite_azimuth():
    """Two massless particles of pt_rel 1/2 at eta 0, phi +-d: m^2 = 2 pt_1 pt_2 (1 - cos 2d) = sin^2 d."""
    half_angle = 0.2
    particles, mask = single_jet([[0.0, half_angle, 0.5], [0.0, -half_angle, 0.5]])
    assert relative_jet_mass(particles, mask)[0] == pytest.approx(np.sin(half_angle), rel=1e-12)


def test_w1efp_columns_select_the_w1_efps_of_the_full_set():
    particles, mask = random_jets(10, 30)
    full = energy_flow_polynomials(particles, mask)
    direct = energy_flow_polynomials(particles, mask, efpset_args=W1_EFP_GRAPHS)
    assert full.shape == (30, 36) and direct.shape == (30, 5)
    np.testing.assert_allclose(full[:, w1efp_columns()], direct, rtol=1e-12)


def test_batched_efps_equal_energyflows_on_the_zero_padded_jets():
    """The batched einsum EFPs (in chunks of 3 jets here) are energyflow's own, EFP by EFP, in its order."""
    particles, mask = random_jets(11, 20)
    efp_set = energyflow.EFPSet(("d<=", 4), measure="hadr", beta=1, normed=None, coords="ptyphim")
    padded = efp_set.batch_compute(particles[..., [PT, ETA, PHI]], n_jobs=1)
    batched = energy_flow_polynomials(particles, mask, chunk_elements=3 * particles.shape[1] ** 2)
    np.testing.assert_allclose(batched, padded, rtol=1e-10)


def test_efps_of_jets_across_phi_rel_pi_equal_energyflows_and_the_unrotated_jets():
    """A jet turned by pi in phi has particles on both sides of phi_rel = +-pi, close in angle:
    energyflow's hadronic measure wraps the azimuthal difference, and so must the batched EFPs.
    Turning a jet changes no angle between its particles, so its EFPs stay those of the jet
    centred at phi_rel = 0; unwrapped differences (near 2 pi instead of a few tenths) break both."""
    centred, mask = single_jet([[0.1, 0.05, 0.5], [-0.05, -0.1, 0.3], [0.0, 0.2, 0.15], [0.2, -0.25, 0.05]])
    turned_phi = centred[0, :, PHI] + np.pi
    odd_particles = np.arange(len(turned_phi)) % 2 == 1
    phi_versions = [
        wrap_phi(turned_phi),  # as preprocessing writes it: in (-pi, pi]
        turned_phi - 2 * np.pi * odd_particles,  # as a generator may write it: beyond pi, and the same angles minus 2 pi
    ]
    turned = np.repeat(centred, len(phi_versions), axis=0)
    turned[..., PHI] = np.where(mask, phi_versions, 0.0)
    turned_mask = np.repeat(mask, len(phi_versions), axis=0)
    for phi, jet_mask in zip(turned[..., PHI], turned_mask):
        assert np.abs(phi[jet_mask][:, None] - phi[jet_mask][None, :]).max() > np.pi  # the wrap matters here
    efp_set = energyflow.EFPSet(("d<=", 4), measure="hadr", beta=1, normed=None, coords="ptyphim")
    batched = energy_flow_polynomials(turned, turned_mask)
    np.testing.assert_allclose(batched, efp_set.batch_compute(turned[..., [PT, ETA, PHI]], n_jobs=1), rtol=1e-10)
    np.testing.assert_allclose(batched, np.repeat(energy_flow_polynomials(centred, mask), len(phi_versions), axis=0), rtol=1e-10)


def test_padded_rows_enter_no_metric():
    real, real_mask = random_jets(12, 40)
    generated, generated_mask = random_jets(13, 40)
    dirty_real, dirty_generated = with_garbage_padding(real, real_mask), with_garbage_padding(generated, generated_mask)

    def all_metrics(real_particles, generated_particles):
        return {
            "w1m": w1m(real_particles, real_mask, generated_particles, generated_mask, 2, 30, np.random.default_rng(14)),
            "w1p": w1p(real_particles, real_mask, generated_particles, generated_mask, 2, 30, np.random.default_rng(14)),
            "efps": energy_flow_polynomials(generated_particles, generated_mask),
            "mass": relative_jet_mass(generated_particles, generated_mask),
            "emd": emd_matrix(generated_particles, generated_mask, real_particles, real_mask, n_jobs=1),
            "cov_mmd": cov_mmd(real_particles, real_mask, generated_particles, generated_mask, n_per_batch=10,
                               n_batches=2, rng=np.random.default_rng(14), n_jobs=1),
        }

    clean, dirty = all_metrics(real, generated), all_metrics(dirty_real, dirty_generated)
    for name in clean:
        np.testing.assert_equal(dirty[name], clean[name], err_msg=name)


# ---------------------------------------------------------------------------------------------
# EMD, coverage and MMD


def test_emd_of_single_particles_is_pt_times_distance():
    """Equal pT p at distance dR: p * dR (R = 1). Unequal: the smaller pT moves, the rest costs 1 per unit pT."""
    at_origin, one_mask = single_jet([[0.0, 0.0, 0.7]], n_max=2)
    equal_pt, _ = single_jet([[0.3, 0.4, 0.7]], n_max=2)
    lower_pt, _ = single_jet([[0.3, 0.4, 0.5]], n_max=2)
    distances = emd_matrix(at_origin, one_mask, np.concatenate([equal_pt, lower_pt]), np.concatenate([one_mask, one_mask]), n_jobs=1)
    np.testing.assert_allclose(distances, [[0.7 * 0.5, 0.5 * 0.5 + 0.2]], rtol=1e-12)


def test_emd_matrix_agrees_with_energyflow_emd_pair_by_pair():
    generated, generated_mask = random_jets(15, 4)
    real, real_mask = random_jets(16, 3)
    distances = emd_matrix(generated, generated_mask, real, real_mask, n_jobs=1)
    assert distances.shape == (4, 3)
    for i in range(4):
        for j in range(3):
            expected = energyflow.emd.emd(
                generated[i][generated_mask[i]][:, [PT, ETA, PHI]], real[j][real_mask[j]][:, [PT, ETA, PHI]], R=1.0, beta=1.0
            )
            assert distances[i, j] == pytest.approx(expected, rel=1e-10)


def test_coverage_and_mmd_of_known_distance_matrices():
    # rows: generated jets, columns: real jets
    one_to_one = np.array([[0.0, 5.0, 5.0], [5.0, 0.0, 5.0], [5.0, 5.0, 0.0]])
    assert coverage_and_mmd(one_to_one) == (1.0, 0.0)
    all_nearest_first = np.array([[1.0, 4.0, 6.0], [2.0, 3.0, 7.0], [0.5, 9.0, 9.0]])
    assert coverage_and_mmd(all_nearest_first) == (pytest.approx(1 / 3), pytest.approx((0.5 + 3.0 + 6.0) / 3))
    two_of_three = np.array([[1.0, 4.0, 6.0], [2.0, 1.5, 7.0]])
    assert coverage_and_mmd(two_of_three) == (pytest.approx(2 / 3), pytest.approx((1.0 + 1.5 + 6.0) / 3))


def test_mode_collapse_gives_the_lowest_coverage_and_a_worse_mmd():
    """Generated jets that are all copies of one real jet: every generated jet has the same nearest
    real jet, so coverage is exactly 1 / n_per_batch; a faithful generator covers far more."""
    real, real_mask = random_jets(17, 200)
    collapsed, collapsed_mask = np.repeat(real[:1], 200, axis=0), np.repeat(real_mask[:1], 200, axis=0)
    n_per_batch = 20
    faithful = cov_mmd(real, real_mask, real, real_mask, n_per_batch=n_per_batch, n_batches=3,
                       rng=np.random.default_rng(18), n_jobs=1)
    collapse = cov_mmd(real, real_mask, collapsed, collapsed_mask, n_per_batch=n_per_batch, n_batches=3,
                       rng=np.random.default_rng(18), n_jobs=1)
    assert collapse["cov"] == pytest.approx(1 / n_per_batch) and collapse["cov_std"] == pytest.approx(0.0, abs=1e-15)
    assert faithful["cov"] > 0.4
    assert collapse["mmd"] > faithful["mmd"] > 0


# ---------------------------------------------------------------------------------------------
# Frechet and kernel physics distances


def test_frechet_distance_of_gaussians_with_known_answers():
    rng = np.random.default_rng(19)
    root = rng.normal(size=(3, 3))
    shared_covariance = root @ root.T + np.eye(3)
    mean_a, mean_b = rng.normal(size=3), rng.normal(size=3)
    assert frechet_distance(mean_a, shared_covariance, mean_b, shared_covariance) == pytest.approx(np.sum((mean_a - mean_b) ** 2))
    assert frechet_distance([1.0], [[4.0]], [-0.5], [[0.25]]) == pytest.approx(1.5**2 + (2.0 - 0.5) ** 2)
    widths_a, widths_b = np.array([1.0, 2.0, 3.0]), np.array([0.5, 2.0, 1.0])
    assert frechet_distance(mean_a, np.diag(widths_a**2), mean_b, np.diag(widths_b**2)) == pytest.approx(
        np.sum((mean_a - mean_b) ** 2) + np.sum((widths_a - widths_b) ** 2)
    )


def test_scale_by_real_maximum_divides_by_the_real_absolute_maximum():
    real = np.array([[1.0, -4.0, 0.0], [-2.0, 2.0, 0.0]])
    generated = np.array([[4.0, 8.0, 3.0]])
    scaled_real, scaled_generated = scale_by_real_maximum(real, generated)
    np.testing.assert_array_equal(scaled_real, [[0.5, -1.0, 0.0], [-1.0, 0.5, 0.0]])
    np.testing.assert_array_equal(scaled_generated, [[2.0, 2.0, 3.0]])


FPD_SIZES = dict(min_jets=100, max_jets=2_000, n_points=6, n_batches=10)


def test_fpd_extrapolates_the_finite_sample_bias_away():
    rng = np.random.default_rng(20)
    real, generated = rng.normal(size=(20_000, 3)), rng.normal(size=(20_000, 3))
    value, error = fpd(real, generated, **FPD_SIZES, rng=rng)
    scaled_real, scaled_generated = scale_by_real_maximum(real, generated)
    smallest_batch_fd = np.mean([
        frechet_distance(a.mean(axis=0), np.cov(a, rowvar=False), b.mean(axis=0), np.cov(b, rowvar=False))
        for a, b in ((scaled_real[rng.integers(20_000, size=100)], scaled_generated[rng.integers(20_000, size=100)])
                     for _ in range(10))
    ])
    assert 0 <= value < 0.1 * smallest_batch_fd
    assert np.isfinite(error)


def test_fpd_of_shifted_gaussians_approaches_the_analytic_distance():
    """Equal covariances, so the Frechet distance is the squared mean shift, here after the max scaling."""
    rng = np.random.default_rng(21)
    shift = np.array([0.5, 1.0, 0.0])
    real, generated = rng.normal(size=(20_000, 3)), rng.normal(size=(20_000, 3)) + shift
    value, error = fpd(real, generated, **FPD_SIZES, rng=rng)
    analytic = np.sum((shift / np.abs(real).max(axis=0)) ** 2)
    assert value == pytest.approx(analytic, rel=0.1)
    assert error < 0.1 * analytic


def test_fpd_of_samples_far_apart_is_huge_not_clamped():
    """A shift of 1e6 real maxima gives a Frechet distance of ~3e12: the extrapolation must report
    it (a fit started near 1 once stayed there and reported 1.0 for jets with exploding features)."""
    rng = np.random.default_rng(22)
    real, generated = rng.normal(size=(2_000, 3)), rng.normal(size=(2_000, 3))
    generated += 1e6 * np.abs(real).max(axis=0)
    value, error = fpd(real, generated, min_jets=500, max_jets=1_500, n_points=4, n_batches=3, rng=rng)
    assert value == pytest.approx(3e12, rel=1e-3)
    assert error < 1e-3 * value


def test_fpd_batch_sizes_are_the_configured_ones_or_scaled_down_to_the_smaller_sample():
    configured = fpd_batch_sizes(60_000, 80_000, min_jets=20_000, max_jets=50_000, n_points=10)
    np.testing.assert_array_equal(configured, np.rint(1 / np.linspace(1 / 20_000, 1 / 50_000, 10)))
    assert configured[0] == 20_000 and configured[-1] == 50_000
    capped = fpd_batch_sizes(10_000, 3_000, min_jets=20_000, max_jets=50_000, n_points=10)
    assert capped[0] == 1_200 and capped[-1] == 3_000  # the configured ratio 2:5, ending at the smaller sample
    np.testing.assert_allclose(1 / capped, np.linspace(1 / 1_200, 1 / 3_000, 10), rtol=1e-3)  # evenly spaced in 1/N
    with pytest.raises(ValueError, match="the smaller sample has 3 jets, too few for FPD batches from 20000 to 50000"):
        fpd_batch_sizes(3, 100, min_jets=20_000, max_jets=50_000, n_points=10)


def test_fpd_of_two_small_samples_of_one_distribution_extrapolates_their_finite_sample_bias_away(monkeypatch):
    """Two samples of 2 500 jets of one distribution, scored with the default batch sizes (20 000 to
    50 000, so capped at 2 500): the Frechet distance of the two whole samples is all finite-sample
    bias, and FPD must extrapolate it away (over 30 seeds FPD stayed below 0.36 of it). Batches drawn
    with replacement carry each sample's own fluctuation into every batch, so their FPD extrapolates
    to that distance instead (at least 0.8 of it over 30 seeds), whether the batches are capped or,
    as this pipeline drew them before, far larger than the samples."""
    rng = np.random.default_rng(30)
    real, generated = rng.normal(size=(2_500, 10)), rng.normal(size=(2_500, 10))
    scaled_real, scaled_generated = scale_by_real_maximum(real, generated)
    whole_samples_distance = frechet_distance(scaled_real.mean(axis=0), np.cov(scaled_real, rowvar=False),
                                              scaled_generated.mean(axis=0), np.cov(scaled_generated, rowvar=False))
    value, error = fpd(real, generated, rng=np.random.default_rng(31))
    assert 0 <= value < 0.5 * whole_samples_distance and np.isfinite(error)

    monkeypatch.setattr(pipeline.metrics, "_subsample_rows", pipeline.metrics._bootstrap_rows)
    capped_with_replacement, _ = fpd(real, generated, rng=np.random.default_rng(31))
    monkeypatch.setattr(pipeline.metrics, "fpd_batch_sizes", lambda n_real, n_generated, min_jets, max_jets, n_points:
                        np.rint(1 / np.linspace(1 / min_jets, 1 / max_jets, n_points)).astype(int))
    beyond_the_samples_with_replacement, _ = fpd(real, generated, min_jets=5_000, max_jets=12_500, rng=np.random.default_rng(31))
    assert capped_with_replacement > 0.5 * whole_samples_distance
    assert beyond_the_samples_with_replacement > 0.5 * whole_samples_distance


def test_polynomial_mmd_squared_matches_a_double_loop():
    rng = np.random.default_rng(22)
    x, y = rng.normal(size=(4, 2)), rng.normal(size=(3, 2)) + 0.5

    def kernel(a, b):
        return (a @ b / 2 + 1) ** 4

    within_x = sum(kernel(x[i], x[j]) for i in range(4) for j in range(4) if i != j) / (4 * 3)
    within_y = sum(kernel(y[i], y[j]) for i in range(3) for j in range(3) if i != j) / (3 * 2)
    across = sum(kernel(x[i], y[j]) for i in range(4) for j in range(3)) / (4 * 3)
    assert polynomial_mmd_squared(x, y) == pytest.approx(within_x + within_y - 2 * across, rel=1e-12)


def test_kpd_batches_leave_out_the_pairs_of_one_jet_drawn_twice():
    """Batches of 12 jets drawn with replacement from 5 repeat jets: each batch's MMD^2 is the mean
    kernel over pairs of different jets (a jet paired with its own repeat adds k(x, x), no draw of
    k(x, x'), and biases it up), here by a double loop over the drawn positions, the real rows first."""
    rng = np.random.default_rng(40)
    real, generated = rng.normal(size=(5, 2)), rng.normal(size=(5, 2)) + 0.3
    value, _ = kpd(real, generated, n_batches=1, n_per_batch=12, rng=np.random.default_rng(41))
    draws = np.random.default_rng(41)
    real_rows, generated_rows = draws.integers(5, size=12), draws.integers(5, size=12)
    x, y = scale_by_real_maximum(real, generated)

    def kernel(a, b):
        return (a @ b / 2 + 1) ** 4

    def within(samples, rows):
        return np.mean([kernel(samples[rows[a]], samples[rows[b]]) for a in range(12) for b in range(12) if rows[a] != rows[b]])

    across = np.mean([kernel(x[i], y[j]) for i in real_rows for j in generated_rows])
    assert value == pytest.approx(within(x, real_rows) + within(y, generated_rows) - 2 * across, rel=1e-12)
    with_repeats_paired = polynomial_mmd_squared(x[real_rows], y[generated_rows])  # repeats in place of the diagonal
    assert value < with_repeats_paired - 0.01 * abs(value)


def test_kpd_is_near_zero_for_one_distribution_and_positive_for_shifted_ones():
    rng = np.random.default_rng(23)
    real, same, shifted = rng.normal(size=(5_000, 3)), rng.normal(size=(5_000, 3)), rng.normal(size=(5_000, 3)) + 0.5
    same_median, same_error = kpd(real, same, n_batches=10, n_per_batch=500, rng=rng)
    shifted_median, shifted_error = kpd(real, shifted, n_batches=10, n_per_batch=500, rng=rng)
    assert shifted_median > 5 * shifted_error
    assert abs(same_median) < 0.05 * shifted_median
    assert same_error < 0.1 * shifted_median


# ---------------------------------------------------------------------------------------------
# Refusal of bad input


def bad_sample(problem):
    particles, mask = random_jets(24, 5)
    if problem == "no jets":
        return particles[:0], mask[:0]
    if problem == "no particles":
        return particles, np.zeros_like(mask)
    if problem == "four features":
        return np.concatenate([particles, particles[..., :1]], axis=-1), mask
    if problem == "mask shape":
        return particles, mask[:, :-1]
    particles[0, 0, PT] = np.nan
    return particles, mask


@pytest.mark.parametrize("problem, message", [
    ("no jets", "the generated sample has no jets"),
    ("no particles", "the generated sample has no valid particles"),
    ("four features", r"the generated particles have shape \(5, 10, 4\)"),
    ("mask shape", "the generated mask has shape"),
    ("nan", "the generated particles contain NaN or infinite values; the sample is broken"),
])
def test_bad_samples_are_refused_with_a_message(problem, message):
    real, real_mask = random_jets(25, 5)
    generated, generated_mask = bad_sample(problem)
    with pytest.raises(ValueError, match=message):
        w1p(real, real_mask, generated, generated_mask, 1, 5, np.random.default_rng(0))
    with pytest.raises(ValueError, match=message):
        emd_matrix(generated, generated_mask, real, real_mask, n_jobs=1)


def test_nan_in_padded_rows_is_not_refused():
    particles, mask = random_jets(26, 5)
    particles[~mask] = np.nan
    assert np.isfinite(relative_jet_mass(particles, mask)).all()


def test_bad_features_and_settings_are_refused_with_a_message():
    rng = np.random.default_rng(27)
    features = rng.normal(size=(50, 3))
    with pytest.raises(ValueError, match="the real values have 3 columns and the generated 2"):
        kpd(features, features[:, :2], n_batches=1, n_per_batch=10, rng=rng)
    with pytest.raises(ValueError, match="the generated values contain NaN"):
        fpd(features, np.full((50, 3), np.nan), min_jets=10, max_jets=20, n_points=3, n_batches=1, rng=rng)
    with pytest.raises(ValueError, match="n_points=2 is too small; set it to at least 3"):
        fpd(features, features, min_jets=10, max_jets=20, n_points=2, n_batches=1, rng=rng)
    with pytest.raises(ValueError, match="n_per_batch=0 is too small"):
        bootstrap_w1(features, features, 1, 0, rng)
    with pytest.raises(ValueError, match="a KPD batch drew a single distinct jet of a sample .1 real, 50 generated jets.: "
                                            "the MMD needs pairs of different jets"):
        kpd(features[:1], features, n_batches=1, n_per_batch=10, rng=rng)


def test_bootstrap_w1_equals_scipys_w1_of_the_drawn_jets():
    """Weights instead of repeated values: the same numbers as JetNet's way, scipy on the drawn jets."""
    import scipy.stats

    real, real_mask = random_jets(20, 60)
    generated, generated_mask = random_jets(21, 45, eta_width=0.15)
    n_batches, n_per_batch = 3, 80
    draws = np.random.default_rng(22)
    expected_w1p, expected_w1m = [], []
    for _ in range(n_batches):
        real_rows, generated_rows = draws.integers(60, size=n_per_batch), draws.integers(45, size=n_per_batch)
        real_batch, generated_batch = real[real_rows][real_mask[real_rows]], generated[generated_rows][generated_mask[generated_rows]]
        expected_w1p.append([scipy.stats.wasserstein_distance(real_batch[:, f], generated_batch[:, f]) for f in range(3)])
    for _ in range(n_batches):
        real_rows, generated_rows = draws.integers(60, size=n_per_batch), draws.integers(45, size=n_per_batch)
        expected_w1m.append(scipy.stats.wasserstein_distance(relative_jet_mass(real, real_mask)[real_rows],
                                                             relative_jet_mass(generated, generated_mask)[generated_rows]))
    rng = np.random.default_rng(22)
    means, stds = w1p(real, real_mask, generated, generated_mask, n_batches, n_per_batch, rng)
    np.testing.assert_allclose(means, np.mean(expected_w1p, axis=0), rtol=1e-12)
    np.testing.assert_allclose(stds, np.std(expected_w1p, axis=0), rtol=1e-9)
    mean, std = w1m(real, real_mask, generated, generated_mask, n_batches, n_per_batch, rng)
    assert mean == pytest.approx(np.mean(expected_w1m), rel=1e-12) and std == pytest.approx(np.std(expected_w1m), rel=1e-9)


def test_unphysical_fractions_count_particles_out_of_reach_and_jets_with_too_much_momentum():
    """Two jets of three particles: one particle at Delta R = hypot(0.9, 0.6) > 1 (its phi given as
    0.6 + 2 pi, which wraps back to 0.6), and a jet whose pt_rel add up to 1.2."""
    particles = np.array([
        [[0.1, 0.1, 0.5], [0.9, 0.6 + 2 * np.pi, 0.3], [-0.2, 0.3, 0.1]],
        [[0.0, 0.2, 0.7], [0.5, -0.5, 0.4], [0.3, 0.0, 0.1]],
    ])
    mask = np.ones((2, 3), bool)
    fractions = pipeline.metrics.unphysical_fractions(particles, mask)
    assert fractions["far_particles"] == pytest.approx(1 / 6)
    assert fractions["pt_rel_sum_over"] == pytest.approx(1 / 2)
    mask[0, 1] = mask[1, 1] = False  # the far particle and the excess momentum are padding now
    assert pipeline.metrics.unphysical_fractions(particles, mask) == {"far_particles": 0.0, "pt_rel_sum_over": 0.0}


# ---------------------------------------------------------------------------------------------
# Golden values: what the JetNet library computes on the same jets (tests/data/make_jetnet_golden.py)


@pytest.fixture(scope="module")
def jetnet_golden():
    with np.load(Path(__file__).parent / "data" / "jetnet_golden.npz") as stored:
        return dict(stored)


def test_fpd_and_kpd_features_and_their_scaling_are_jetnets(jetnet_golden):
    golden = jetnet_golden
    features = {side: energy_flow_polynomials(golden[f"{side}_particles"], golden[f"{side}_mask"]) for side in ("real", "generated")}
    for side, values in features.items():
        np.testing.assert_allclose(values, golden[f"{side}_features"], rtol=1e-5, atol=1e-12, err_msg=side)  # float32 jets
    scaled = scale_by_real_maximum(golden["real_features"], golden["generated_features"])
    np.testing.assert_allclose(scaled[0], golden["real_scaled"], rtol=1e-12)
    np.testing.assert_allclose(scaled[1], golden["generated_scaled"], rtol=1e-12)


def test_the_frechet_distance_and_polynomial_mmd_of_whole_samples_are_jetnets(jetnet_golden):
    real, generated = jetnet_golden["real_scaled"], jetnet_golden["generated_scaled"]
    distance = frechet_distance(real.mean(axis=0), np.cov(real, rowvar=False), generated.mean(axis=0), np.cov(generated, rowvar=False))
    np.testing.assert_allclose(distance, jetnet_golden["frechet_distance"], rtol=1e-6)
    np.testing.assert_allclose(polynomial_mmd_squared(real, generated), jetnet_golden["polynomial_mmd_squared"], rtol=1e-9)


def test_coverage_and_mmd_of_one_batch_are_jetnets(jetnet_golden):
    n = 60  # the jets JetNet's cov_mmd scored, the first of each sample
    golden = jetnet_golden
    distances = emd_matrix(golden["generated_particles"][:n], golden["generated_mask"][:n],
                           golden["real_particles"][:n], golden["real_mask"][:n])
    coverage, mmd = coverage_and_mmd(distances)
    assert coverage == pytest.approx(float(golden["coverage"]), abs=1e-12)
    assert mmd == pytest.approx(float(golden["mmd"]), rel=1e-9)
