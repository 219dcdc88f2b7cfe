"""Small raw jet files in every real format the pipeline reads, and what preprocessing must make of them.

``random_jets`` makes jets as lists of particle four-momenta (E, px, py, pz) in GeV, including the
awkward cases: a jet across the phi = +-pi seam, particles out of pT order, more particles than
``n_max``, an empty jet and a jet with a NaN. The writers store them as JetClass-style ROOT
(uproot), JetNet HDF5 (h5py), top-tagging pandas HDF5 (pandas + PyTables, as the real files were
made) and energyflow's quark/gluon npz. ``expected_sets`` is an independent, jet-by-jet reference
of the sets file's contents written with the ``math`` module.
"""

from __future__ import annotations

import math

import awkward as ak
import h5py
import numpy as np
import pandas as pd
import uproot

EMPTY_JET = 3  # index of the jet with no particles
NAN_JET = 5  # index of the jet with a NaN momentum component


def random_jets(rng: np.random.Generator, n_jets: int, max_particles: int = 14) -> list[np.ndarray]:
    """Jets as ``[n_particles, 4]`` arrays of (E, px, py, pz), float32-representable."""
    jets = []
    for index in range(n_jets):
        n = 0 if index == EMPTY_JET else int(rng.integers(1, max_particles + 1))
        axis_eta = rng.uniform(-2.0, 2.0)
        axis_phi = math.pi - 0.05 if index == 0 else rng.uniform(-math.pi, math.pi)  # jet 0 straddles the seam
        pt = rng.exponential(30.0, n) + 1.0
        eta = axis_eta + rng.normal(0.0, 0.2, n)
        phi = axis_phi + rng.normal(0.0, 0.2, n)
        mass = rng.choice([0.0, 0.13957, 0.49368], n)
        px, py, pz = pt * np.cos(phi), pt * np.sin(phi), pt * np.sinh(eta)
        energy = np.sqrt(px**2 + py**2 + pz**2 + mass**2)
        particles = np.stack([energy, px, py, pz], axis=1).astype(np.float32)
        if index == NAN_JET:
            particles[0, 1] = np.nan
        jets.append(particles)
    return jets


def expected_sets(jets: list[np.ndarray], labels: list[int], n_max: int) -> dict[str, np.ndarray]:
    """The sets-file rows these jets must become, jet by jet (empty and non-finite jets dropped),
    ordered by jet pT so they can be compared with any split and shuffle."""
    rows = []
    for particles, label in zip(jets, labels):
        if len(particles) == 0 or not np.isfinite(particles).all():
            continue
        energy, px, py, pz = (math.fsum(float(value) for value in particles[:, column]) for column in range(4))
        jet_pt = math.hypot(px, py)
        jet_eta, jet_phi = math.asinh(pz / jet_pt), math.atan2(py, px)
        jet_mass = math.sqrt(max(energy**2 - px**2 - py**2 - pz**2, 0.0))
        features = []
        for _, particle_px, particle_py, particle_pz in particles.astype(np.float64):
            pt = math.hypot(particle_px, particle_py)
            phi_rel = math.remainder(math.atan2(particle_py, particle_px) - jet_phi, 2 * math.pi)
            features.append((math.asinh(particle_pz / pt) - jet_eta, math.pi if phi_rel == -math.pi else phi_rel, pt / jet_pt))
        features.sort(key=lambda feature: -feature[2])
        kept = features[:n_max]
        padded = np.zeros((n_max, 3))
        padded[: len(kept)] = kept
        rows.append((jet_pt, padded, np.arange(n_max) < len(kept), [jet_pt, jet_eta, jet_mass, len(kept)], label))
    rows.sort(key=lambda row: row[0])
    return {
        "particles": np.array([row[1] for row in rows]), "mask": np.array([row[2] for row in rows]),
        "jets": np.array([row[3] for row in rows]), "labels": np.array([row[4] for row in rows]),
    }


def sort_by_jet_pt(sets: dict) -> dict[str, np.ndarray]:
    order = np.argsort(sets["jets"][:, 0], kind="stable")
    return {name: sets[name][order] for name in ("particles", "mask", "jets", "labels")}


def write_root(path, jets: list[np.ndarray], label_branches: dict[str, list[bool]]) -> None:
    """JetClass style: tree ``tree``, float32 jagged ``part_energy/px/py/pz``, one-hot labels."""
    counts = [len(particles) for particles in jets]
    flat = np.concatenate(jets) if jets else np.zeros((0, 4), np.float32)
    part = ak.zip({name: ak.unflatten(flat[:, column], counts) for column, name in enumerate(("energy", "px", "py", "pz"))})
    branches = {"part": part, **{name: np.array(values, dtype=bool) for name, values in label_branches.items()}}
    with uproot.recreate(path) as file:
        file.mktree("tree", {name: array.type if isinstance(array, ak.Array) else array.dtype for name, array in branches.items()})
        file["tree"].extend(branches)


def write_jetnet(path, jets: list[np.ndarray], n_slots: int, rng: np.random.Generator) -> None:
    """JetNet layout: ``particle_features[N, n_slots, 4]`` = (etarel, phirel, ptrel, mask) with
    the particles in random order (the stage sorts), ``jet_features[N, 4]`` = (pt, eta, mass, n)."""
    reference = expected_sets(jets, [0] * len(jets), n_slots)
    particle_features = np.zeros((len(reference["labels"]), n_slots, 4), np.float32)
    for row, (features, mask) in enumerate(zip(reference["particles"], reference["mask"])):
        order = rng.permutation(int(mask.sum()))
        particle_features[row, : len(order), :3] = features[mask][order]
        particle_features[row, : len(order), 3] = 1.0
    with h5py.File(path, "w") as file:
        file["particle_features"] = particle_features
        file["jet_features"] = reference["jets"].astype(np.float32)


def write_toptagging(path, jets: list[np.ndarray], is_signal: list[int], n_slots: int) -> None:
    """The top-tagging frame: ``E_i, PX_i, PY_i, PZ_i`` for i < n_slots, zero-padded, hardest
    first, plus ``truthE`` and ``ttv`` (ignored) and ``is_signal_new``; pandas "fixed" format."""
    columns = {}
    values = np.zeros((len(jets), n_slots, 4), np.float32)
    for row, particles in enumerate(jets):
        hardest = particles[np.argsort(-np.hypot(particles[:, 1], particles[:, 2]), kind="stable")][:n_slots]
        values[row, : len(hardest)] = hardest
    for slot in range(n_slots):
        for column, prefix in enumerate(("E", "PX", "PY", "PZ")):
            columns[f"{prefix}_{slot}"] = values[:, slot, column]
    columns["truthE"] = np.zeros(len(jets), np.float32)
    columns["ttv"] = np.zeros(len(jets), np.int64)
    columns["is_signal_new"] = np.array(is_signal, np.int64)
    pd.DataFrame(columns).to_hdf(path, key="table", mode="w", format="fixed")


def write_quark_gluon(path, jets: list[np.ndarray], y: list[int], pids: np.ndarray, n_slots: int) -> None:
    """energyflow's qg_jets layout: ``X[N, n_slots, 4]`` = (pt, rapidity, phi, pdgid), ``y``.
    Returns nothing; the four-momenta the stage sees are those of ``pt, y, phi`` and the pids'
    masses, so callers build ``jets`` with ``four_momenta_of_quark_gluon``."""
    X = np.zeros((len(jets), n_slots, 4))
    for row, particles in enumerate(jets):
        energy, px, py, pz = particles.astype(np.float64).T
        n = len(energy)
        X[row, :n, 0] = np.hypot(px, py)
        X[row, :n, 1] = 0.5 * np.log((energy + pz) / (energy - pz))
        X[row, :n, 2] = np.arctan2(py, px)
        X[row, :n, 3] = pids[row, :n]
    np.savez_compressed(path, X=X, y=np.array(y, np.float64))


def processed_dataset(folder, class_names=("g", "q", "t"), jets_per_class: int = 40, seed: int = 0):
    """Random jets of each class written as generated ROOT shards under ``folder/raw`` and preprocessed
    into ``folder/processed`` (n_max 30, up to 14 particles a jet); returns the processed folder."""
    from conftest import compose_config
    from pipeline.preprocess import preprocess

    rng = np.random.default_rng(seed)
    (folder / "raw").mkdir(parents=True, exist_ok=True)
    for name in class_names:
        jets = [jet for jet in random_jets(rng, jets_per_class) if len(jet) and np.isfinite(jet).all()]
        write_root(folder / "raw" / f"{name}_000.root", jets, {f"label_{other}": [other == name] * len(jets) for other in "gqtwz"})
    cfg = compose_config(f"data.raw_dir={folder / 'raw'}", f"data.processed_dir={folder / 'processed'}",
                         "data.generator.n_shards=1", f"data.class_names=[{','.join(class_names)}]")
    preprocess(cfg, folder / "processed", progress=False)
    return folder / "processed"
