"""Jet kinematics: the one place for the formulas that turn four-momenta into the sets file's features.

Conventions (as JetNet, Kansal et al. 2021, arXiv:2106.11535): transverse momentum
``pt = sqrt(px^2 + py^2)``, pseudorapidity ``eta = asinh(pz / pt)``, azimuth ``phi = atan2(py, px)``
and invariant mass ``m = sqrt(E^2 - |p|^2)`` (clipped at 0 against rounding). A particle's
coordinates relative to its jet are ``eta_rel = eta - eta_jet``, ``phi_rel = phi - phi_jet``
wrapped to (-pi, pi], and ``pt_rel = pt / pt_jet``, with the jet the four-vector sum of all its
constituents. Every function works elementwise, on numpy arrays and on jagged awkward arrays alike.
"""

from __future__ import annotations

import numpy as np

# Physicality limits of a jet of relative particles. The constituents of an anti-kT R = 0.8 jet lie
# within about R of its axis (a little beyond once the axis is the sum of the kept particles), and the
# momentum fractions of the hardest ones add up to at most ~1 (to 1 exactly, in pT, for all of them).
FAR_PARTICLE_DELTA_R = 1.0
PT_REL_SUM_LIMIT = 1.05


def transverse_momentum(px, py):
    return np.hypot(px, py)


def pseudorapidity(px, py, pz):
    """``asinh(pz / pt)``; infinite along the beam (pt = 0)."""
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.arcsinh(pz / transverse_momentum(px, py))


def rapidity(energy, pz):
    """``y = 1/2 ln((E + pz) / (E - pz))``: the longitudinal coordinate FastJet clusters in."""
    return 0.5 * np.log((energy + pz) / (energy - pz))


def azimuth(px, py):
    return np.arctan2(py, px)


def invariant_mass(energy, px, py, pz):
    return np.sqrt(np.maximum(energy**2 - px**2 - py**2 - pz**2, 0.0))


def wrap_phi(angle):
    """``angle`` mapped into (-pi, pi] (so -pi becomes pi), by whole turns."""
    return angle - 2 * np.pi * np.ceil((angle - np.pi) / (2 * np.pi))


def delta_r(eta_a, phi_a, eta_b, phi_b):
    """Angular distance ``sqrt(d_eta^2 + d_phi^2)`` with the azimuthal difference wrapped."""
    return np.hypot(eta_a - eta_b, wrap_phi(phi_a - phi_b))


def four_momentum_from_pt_y_phi(pt, rapidity, phi, mass):
    """``(E, px, py, pz)`` of particles given as (pt, rapidity y, phi, mass), as in energyflow's
    quark/gluon dataset: ``E = mT cosh y``, ``pz = mT sinh y`` with ``mT = sqrt(pt^2 + m^2)``."""
    transverse_mass = np.hypot(pt, mass)
    return transverse_mass * np.cosh(rapidity), pt * np.cos(phi), pt * np.sin(phi), transverse_mass * np.sinh(rapidity)


def jet_kinematics(energy, px, py, pz) -> dict[str, np.ndarray]:
    """``pt, eta, phi, mass`` of jets given their four-momenta (for a jet: the sum over all its
    constituents, the E-scheme of FastJet)."""
    return {
        "pt": transverse_momentum(px, py),
        "eta": pseudorapidity(px, py, pz),
        "phi": azimuth(px, py),
        "mass": invariant_mass(energy, px, py, pz),
    }


def massless_four_momentum(pt, eta, phi):
    """``(E, px, py, pz)`` of massless particles given as (pt, eta, phi): ``E = pt cosh eta``,
    ``pz = pt sinh eta`` (for a massless particle rapidity and pseudorapidity coincide)."""
    return pt * np.cosh(eta), pt * np.cos(phi), pt * np.sin(phi), pt * np.sinh(eta)


def jet_from_relative_particles(eta_rel, phi_rel, pt_rel, mask) -> dict[str, np.ndarray]:
    """Jet kinematics from padded sets in the sets file's coordinates, ``[n_jets, n_max]`` each.

    The particles are taken as massless and summed over the real ones (``mask``), as JetNet's
    ``jet_features`` does (Kansal et al. 2021, arXiv:2106.11535), so the jet's ``pt`` and ``mass``
    are in units of the original jet pT (``mass`` is the relative mass m/pT that ``w1m`` compares),
    and its ``eta``, ``phi`` are relative to the original jet axis.
    """
    weight = np.asarray(mask, dtype=np.float64)
    energy, px, py, pz = massless_four_momentum(
        np.asarray(pt_rel, np.float64) * weight, np.asarray(eta_rel, np.float64), np.asarray(phi_rel, np.float64)
    )
    return jet_kinematics(*(component.sum(axis=-1) for component in (energy, px, py, pz)))


def relative_coordinates(px, py, pz, jet: dict[str, np.ndarray]):
    """``(eta_rel, phi_rel, pt_rel)`` of particles relative to their jet: ``jet`` as returned by
    ``jet_kinematics``, one value per particle (or broadcastable to the particles)."""
    eta_rel = pseudorapidity(px, py, pz) - jet["eta"]
    phi_rel = wrap_phi(azimuth(px, py) - jet["phi"])
    pt_rel = transverse_momentum(px, py) / jet["pt"]
    return eta_rel, phi_rel, pt_rel
