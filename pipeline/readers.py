"""Raw jet file readers: one per source format, each turning a slice of a file into ``RawJets``.

Every reader has ``n_jets(path)``, ``load(path, start, stop)`` (the I/O, run in a background thread
by ``pipeline.preprocess``) and ``parse(loaded)`` (numpy work into ``RawJets``), and says with
``interleave`` whether each file holds one class (read a slice of every file per chunk) or all of
them. A file that is not of the expected format, or is damaged, is refused with a
``PipelineError`` that names it and what to do.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import awkward as ak
import energyflow
import h5py
import numpy as np
import uproot
from omegaconf import DictConfig

from .config import Source, jetnet_file_name
from .files import PipelineError
from .jets import four_momentum_from_pt_y_phi, jet_kinematics, relative_coordinates, transverse_momentum, wrap_phi

UNLABELLED = -1  # class index of a jet whose class is not in data.class_names


@dataclass
class RawJets:
    """A chunk of jets from any source, flat over particles (jet ``j`` owns the next
    ``counts[j]`` entries of every per-particle array).

    ``pt`` orders the particles of a jet (their pT, or pt_rel). ``columns`` are what the source
    stores per particle; ``relative(columns, jet)`` turns them, padded to ``[jets, n_max]``, into
    ``(eta_rel, phi_rel, pt_rel)``, so the coordinates are computed only for the particles kept.
    ``jet`` holds ``pt, eta, phi, mass`` per jet. Class indices are ``UNLABELLED`` for classes
    that are not wanted.
    """

    counts: np.ndarray
    pt: np.ndarray
    columns: tuple[np.ndarray, ...]
    relative: Callable[..., tuple[np.ndarray, np.ndarray, np.ndarray]]
    jet: dict[str, np.ndarray]
    labels: np.ndarray

    @classmethod
    def from_four_momenta(cls, counts, energy, px, py, pz, labels) -> "RawJets":
        """Jets as the four-vector sums of their particles (flat ``energy, px, py, pz``)."""
        jet = jet_kinematics(*(per_jet_sum(values, counts) for values in (energy, px, py, pz)))

        def relative(px, py, pz, jet):
            # In the particles' own precision (float32 in JetClass): the output is float32.
            return relative_coordinates(px, py, pz, {name: values[:, None].astype(px.dtype) for name, values in jet.items()})

        return cls(counts, transverse_momentum(px, py), (px, py, pz), relative, jet, labels)


def per_jet_sum(values: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """Sum of flat per-particle ``values`` over each jet, in float64 (0 for a jet with none)."""
    # reduceat sums values[start[j]:start[j+1]]; a trailing zero keeps every start a valid index
    # (trailing empty jets start at len(values)). An empty jet's "sum" is one value: set to 0.
    starts = np.cumsum(counts) - counts
    sums = np.add.reduceat(np.append(values.astype(np.float64), 0.0), starts) if len(counts) else np.zeros(0)
    return np.where(counts > 0, sums, 0.0)


class RootReader:
    """JetClass-style ROOT trees (``pipeline.generate`` output, JetClass): tree ``tree`` with
    jagged ``part_energy, part_px, part_py, part_pz`` and one-hot ``label_*`` branches."""

    interleave = True  # one class per file: read every file in every chunk
    tree_name = "tree"
    momenta = ("part_energy", "part_px", "part_py", "part_pz")

    def __init__(self, data: DictConfig):
        self.label_branches = [data.labels.get(name, f"label_{name}") for name in data.class_names]

    def _open(self, path: Path):
        """The ROOT file, checked to hold the tree and every branch this reader needs."""
        try:
            file = uproot.open(path)
        except Exception as error:  # uproot raises several types for a file that is not ROOT
            raise PipelineError(f"{path} is not a readable ROOT file ({error}); download or generate it again.") from None
        if self.tree_name not in file:
            file.close()
            raise PipelineError(f"{path} has no tree {self.tree_name!r}; is it a JetClass-style file?")
        missing = [branch for branch in (*self.momenta, *self.label_branches) if branch not in file[self.tree_name]]
        if missing:
            file.close()
            raise PipelineError(f"{path}: tree {self.tree_name!r} has no branch {missing[0]!r}; check data.labels or the file.")
        return file

    def n_jets(self, path: Path) -> int:
        with self._open(path) as file:
            return file[self.tree_name].num_entries

    def load(self, path: Path, start: int, stop: int) -> ak.Array:
        with self._open(path) as file:
            try:
                return file[self.tree_name].arrays([*self.momenta, *self.label_branches], entry_start=start, entry_stop=stop)
            except Exception as error:  # uproot raises OSError, ValueError and its own types for damaged baskets
                raise PipelineError(damaged(path, start, stop, error)) from None

    def parse(self, arrays: ak.Array) -> RawJets:
        one_hot = np.stack([ak.to_numpy(arrays[branch]).astype(bool) for branch in self.label_branches], axis=1)
        labels = np.where(one_hot.any(axis=1), one_hot.argmax(axis=1), UNLABELLED)
        counts = ak.to_numpy(ak.num(arrays[self.momenta[0]]))
        momenta = (ak.to_numpy(ak.flatten(arrays[name])) for name in self.momenta)
        return RawJets.from_four_momenta(counts, *momenta, labels)


class JetNetReader:
    """JetNet HDF5 (Kansal et al. 2021): one file per class, ``particle_features[N, n, 4]`` =
    (etarel, phirel, ptrel, mask), ``jet_features[N, 4]`` = (pt, eta, mass, num_particles)."""

    interleave = True

    def __init__(self, data: DictConfig):
        self.class_of_file = {jetnet_file_name(data.labels, name): index for index, name in enumerate(data.class_names)}

    # dataset -> its shape after the jet axis: (particles, features) and (features,)
    shapes = {"particle_features": (None, 4), "jet_features": (4,)}

    def _datasets(self, file: h5py.File, path: Path) -> tuple[h5py.Dataset, h5py.Dataset]:
        """``particle_features`` and ``jet_features``, checked to have JetNet's shapes and one row per jet each."""
        for name, shape in self.shapes.items():
            if name not in file or not isinstance(file[name], h5py.Dataset):
                raise PipelineError(f"{path} has no dataset {name!r}; is it a JetNet file?")
            got = file[name].shape[1:]
            if len(got) != len(shape) or got[-1] != shape[-1]:
                expected = "[jets, particles, 4]" if len(shape) == 2 else "[jets, 4]"
                raise PipelineError(f"{path}: {name!r} has shape {list(file[name].shape)}, JetNet's is {expected}; "
                                    "is it a JetNet file?")
        particles, jets = file["particle_features"], file["jet_features"]
        if len(particles) != len(jets):
            raise PipelineError(f"{path}: 'particle_features' holds {len(particles)} jets and 'jet_features' "
                                f"{len(jets)}; the file is damaged, download it again.")
        return particles, jets

    def n_jets(self, path: Path) -> int:
        with open_hdf5(path) as file:
            return len(self._datasets(file, path)[1])

    def load(self, path: Path, start: int, stop: int) -> dict:
        with open_hdf5(path) as file:
            particles, jets = self._datasets(file, path)
            try:
                particles, jets = particles[start:stop], jets[start:stop]
            except OSError as error:  # a truncated file: its header is whole, its data are not
                raise PipelineError(damaged(path, start, stop, error)) from None
        return {"particles": particles, "jets": jets, "class_index": self.class_of_file[path.name]}

    def parse(self, loaded: dict) -> RawJets:
        particles, jets = loaded["particles"], loaded["jets"].astype(np.float64)
        valid = particles[..., 3] > 0
        labels = np.full(len(jets), loaded["class_index"], dtype=np.int64)
        eta_rel, phi_rel, pt_rel = (particles[..., feature][valid] for feature in range(3))

        def relative(eta_rel, phi_rel, pt_rel, jet):
            return eta_rel, wrap_phi(phi_rel), pt_rel

        jet = {"pt": jets[:, 0], "eta": jets[:, 1], "mass": jets[:, 2]}
        return RawJets(valid.sum(axis=1), pt_rel, (eta_rel, phi_rel, pt_rel), relative, jet, labels)


class TopTaggingReader:
    """The top-tagging reference dataset (Kasieczka et al. 2019, arXiv:1902.09914): a pandas
    "fixed" HDF5 frame under key ``table`` with columns ``E_i, PX_i, PY_i, PZ_i`` (particle i,
    zero-padded by pt) and ``is_signal_new``. Read with h5py, rows sliced straight from the
    frame's blocks, so neither pandas nor PyTables is needed."""

    interleave = False  # every file holds both classes
    label_column = "is_signal_new"

    def __init__(self, data: DictConfig):
        self.class_of_value = class_of_value(data, self.label_column)

    def _columns(self, file: h5py.File, path: Path) -> dict[str, tuple[str, int]]:
        """Column name -> (block dataset, column index) of the pandas frame."""
        if "table" not in file or "nblocks" not in file["table"].attrs:
            raise PipelineError(f"{path} has no pandas frame under key 'table'; is it a top-tagging file?")
        table = file["table"]
        columns = {}
        for block in range(int(table.attrs["nblocks"])):
            for index, name in enumerate(table[f"block{block}_items"][:]):
                columns[name.decode()] = (f"table/block{block}_values", index)
        return columns

    def n_jets(self, path: Path) -> int:
        with open_hdf5(path) as file:
            self._columns(file, path)
            return file["table/axis1"].shape[0]

    def load(self, path: Path, start: int, stop: int) -> dict[str, np.ndarray]:
        """The frame's momentum and label columns for rows ``start:stop``."""
        with open_hdf5(path) as file:
            columns = self._columns(file, path)
            n_slots = sum(1 for name in columns if name.startswith("E_"))
            wanted = [f"{prefix}_{slot}" for prefix in ("E", "PX", "PY", "PZ") for slot in range(n_slots)]
            missing = [name for name in (*wanted, self.label_column) if name not in columns]
            if n_slots == 0 or missing:
                raise PipelineError(f"{path} has no column {(missing or ['E_0'])[0]!r}; is it a top-tagging file?")
            try:
                blocks = {block: file[block][start:stop] for block in {columns[name][0] for name in (*wanted, self.label_column)}}
            except OSError as error:
                raise PipelineError(damaged(path, start, stop, error)) from None
        column = {name: blocks[columns[name][0]][:, columns[name][1]] for name in (*wanted, self.label_column)}
        loaded = {
            prefix: np.stack([column[f"{prefix}_{slot}"] for slot in range(n_slots)], axis=1) for prefix in ("E", "PX", "PY", "PZ")
        }
        return {**loaded, "label": column[self.label_column]}

    def parse(self, loaded: dict[str, np.ndarray]) -> RawJets:
        valid = loaded["E"] > 0
        momenta = (loaded[prefix][valid] for prefix in ("E", "PX", "PY", "PZ"))
        return RawJets.from_four_momenta(valid.sum(axis=1), *momenta, class_indices(loaded["label"], self.class_of_value))


class QuarkGluonReader:
    """energyflow's quark/gluon jets (Komiske, Metodiev, Thaler 2019, arXiv:1810.05165): npz with
    ``X[N, n, 4]`` = (pt, rapidity, phi, pdgid), zero-padded, and ``y`` (1 quark, 0 gluon).
    An npz member cannot be read in slices, so one file at a time is held in memory."""

    interleave = False  # every file holds both classes

    def __init__(self, data: DictConfig):
        self.class_of_value = class_of_value(data, "y")
        self._loaded: tuple[Path, np.ndarray, np.ndarray] | None = None

    def _load(self, path: Path) -> tuple[np.ndarray, np.ndarray]:
        if self._loaded is None or self._loaded[0] != path:
            try:
                archive = np.load(path)
            except (OSError, ValueError) as error:
                raise PipelineError(f"{path} is not a readable npz file ({error}); download it again.") from None
            with archive:
                for name in ("X", "y"):
                    if name not in archive.files:
                        raise PipelineError(f"{path} has no array {name!r}; is it an energyflow qg_jets file?")
                self._loaded = (path, archive["X"], archive["y"])
        return self._loaded[1], self._loaded[2]

    def n_jets(self, path: Path) -> int:
        return len(self._load(path)[1])

    def load(self, path: Path, start: int, stop: int) -> tuple[np.ndarray, np.ndarray]:
        return tuple(array[start:stop] for array in self._load(path))

    def parse(self, loaded: tuple[np.ndarray, np.ndarray]) -> RawJets:
        particles, y = loaded
        valid = particles[..., 0] > 0
        pt, rapidity, phi, pid = (particles[..., feature][valid] for feature in range(4))
        mass = energyflow.pids2ms(pid.astype(np.int64))
        momenta = four_momentum_from_pt_y_phi(pt, rapidity, phi, mass)
        return RawJets.from_four_momenta(valid.sum(axis=1), *momenta, class_indices(y, self.class_of_value))


READERS = {
    Source.pythia: RootReader, Source.jetclass: RootReader, Source.jetnet: JetNetReader,
    Source.toptagging: TopTaggingReader, Source.qg: QuarkGluonReader,
}


def class_of_value(data: DictConfig, column: str) -> dict[int, int]:
    """Label-column value -> class index, from ``data.labels`` (class name -> value)."""
    missing = [name for name in data.class_names if name not in data.labels]
    if missing:
        raise PipelineError(f"data.labels has no value of {column!r} for class {missing[0]!r}; add it to the data config.")
    return {int(data.labels[name]): index for index, name in enumerate(data.class_names)}


def class_indices(values: np.ndarray, class_of_value: dict[int, int]) -> np.ndarray:
    """Class index of each jet from its label-column value (``UNLABELLED`` for other values)."""
    indices = np.full(len(values), UNLABELLED, dtype=np.int64)
    for value, index in class_of_value.items():
        indices[values.astype(np.int64) == value] = index
    return indices


def damaged(path: Path, start: int, stop: int, error: Exception) -> str:
    """The sentence for a raw file whose jets ``start:stop`` cannot be read although it opened."""
    reason = " ".join(str(error).split())
    return (f"{path} is truncated or damaged: jets {start} to {stop} cannot be read ({reason[:200]}); "
            "download or generate it again.")


def open_hdf5(path: Path) -> h5py.File:
    try:
        return h5py.File(path, "r")
    except OSError as error:
        raise PipelineError(f"{path} is not a readable HDF5 file ({error}); download it again.") from None
