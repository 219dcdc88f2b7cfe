"""Preprocess stage: raw jet files of any source -> padded sets with masks (``pipeline.sets``).

``python -m pipeline.preprocess data=<name>`` reads ``data.raw_dir`` and writes
``data.processed_dir/{train,val,test}.h5`` and ``normalisation.json``. A jet's way through it:

1. A reader loads a slice of a raw file (I/O) and parses it into flat per-particle arrays, jet
   ``(pt, eta, mass)`` and a class index (``RawJets``). Sources with four-momenta (Pythia and
   JetClass ROOT files, top tagging, quark/gluon) go through ``pipeline.jets``: the jet is the
   four-vector sum of all its constituents and particles are taken relative to it. JetNet files
   hold relative coordinates and jet features already.
2. Jets with no particles, with a non-finite value, or of a class not in ``data.class_names`` are
   dropped and counted (the counts are logged and stored in every output file's attributes).
3. Particles are sorted by decreasing ``pt_rel``; the ``n_max`` hardest are kept, the rest of the
   rows are zero padding with ``mask`` False. ``n_particles`` is the number kept.
4. Each jet goes to train, val or test: within every chunk a seeded permutation deals out
   exactly the configured fractions (cumulative rounding, so the totals over all chunks are exact).
5. Normalisation statistics (mean, std) come from the train split only, over valid particles:
   of every feature (``particles``) and of ``log(pt_rel)`` (``log_particles``).

Inputs are streamed in chunks of ``data.chunk_jets`` jets; for sources with one file per class
every chunk takes a proportional slice of every file, so classes are mixed throughout. Each output
file records its source files with their SHA-256.
"""

from __future__ import annotations

import hashlib
import json
import math
import time
import threading
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import awkward as ak
import energyflow
import h5py
import hydra
import mlflow
import numpy as np
import uproot
from omegaconf import DictConfig, OmegaConf
from tqdm import tqdm

from .background import in_background
from .config import Config, Source
from .jets import four_momentum_from_pt_y_phi, jet_kinematics, relative_coordinates, transverse_momentum, wrap_phi
from .sets import write_sets
from .files import PipelineError, atomic_output
from .stage import stage

SPLITS = ("train", "val", "test")
UNLABELLED = -1  # class index of a jet whose class is not in data.class_names
DROP_REASONS = ("empty_jets", "nonfinite_jets", "unlabelled_jets")


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
        self.class_of_file = {data.labels.get(name, f"{name}.hdf5"): index for index, name in enumerate(data.class_names)}

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


def raw_files(data: DictConfig) -> list[Path]:
    """The raw files of a dataset, in a fixed order; each must exist."""
    raw_dir, source = Path(data.raw_dir), Source(data.source)
    if source == Source.pythia:
        names = [f"{name}_{shard:03d}.root" for name in data.class_names for shard in range(data.generator.n_shards)]
        remedy = "python -m pipeline.generate"
    elif source == Source.jetnet:
        names = [data.labels.get(name, f"{name}.hdf5") for name in data.class_names]
        remedy = "python -m pipeline.download"
    else:
        names = [member for name, remote in data.files.items() for member in (remote.members or [name])]
        remedy = "python -m pipeline.download"
    paths = [raw_dir / name for name in names]
    for path in paths:
        if not path.is_file():
            raise PipelineError(f"raw file {path} does not exist; run `{remedy} data={data.name}` first.")
    return paths


def chunk_plan(reader, paths: list[Path], chunk_jets: int) -> list[list[tuple[Path, int, int]]]:
    """Which rows of which files make each chunk: a proportional slice of every file per chunk
    (``reader.interleave``), or each file in turn."""
    sizes = [reader.n_jets(path) for path in paths]
    if reader.interleave:
        n_chunks = max(1, math.ceil(sum(sizes) / chunk_jets))
        return [
            [(path, k * size // n_chunks, (k + 1) * size // n_chunks) for path, size in zip(paths, sizes)
             if (k + 1) * size // n_chunks > k * size // n_chunks]
            for k in range(n_chunks)
        ]
    return [[(path, start, min(start + chunk_jets, size))] for path, size in zip(paths, sizes) for start in range(0, size, chunk_jets)]


def descending_within_jets(values: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """Indices that sort flat per-particle ``values`` in decreasing order within each jet (stable;
    no work when they already are, as in JetNet, JetClass, top tagging and ``pipeline.generate``)."""
    starts_jet = np.zeros(len(values), dtype=bool)
    starts_jet[np.cumsum(counts)[:-1][counts[1:] > 0]] = True
    if np.all((values[1:] <= values[:-1]) | starts_jet[1:]):
        return np.arange(len(values))
    order = ak.argsort(ak.unflatten(values, counts), axis=1, ascending=False, stable=True)
    return ak.to_numpy(ak.flatten(order)) + np.repeat(np.cumsum(counts) - counts, counts)


def to_sets(raw: RawJets, n_max: int) -> tuple[dict[str, np.ndarray], dict[str, int]]:
    """Drop what cannot be used, sort, truncate and pad: the arrays of the sets file, and how many
    jets were dropped for which reason. A jet is dropped as non-finite when a particle's pT, one of
    its kept particles' coordinates or one of its jet features is NaN or infinite."""
    counts = raw.counts.astype(np.int64)
    empty = counts == 0
    finite = per_jet_sum(~np.isfinite(raw.pt), counts) == 0
    for name in ("pt", "eta", "mass"):
        finite &= np.isfinite(raw.jet[name])
    labelled = raw.labels != UNLABELLED
    keep = ~empty & finite & labelled
    # Sorting keeps every particle in its jet, so a particle's rank in its jet is its position
    # after sorting minus where its jet starts; the n_max hardest of each kept jet are scattered
    # into their padded rows, where the coordinates are computed jet by jet (broadcast).
    order = descending_within_jets(raw.pt, counts)
    rank = np.arange(len(order)) - np.repeat(np.cumsum(counts) - counts, counts)
    jet_of_particle = np.repeat(np.arange(len(counts)), counts)
    copied = (rank < n_max) & keep[jet_of_particle]
    destination = (np.cumsum(keep) - 1)[jet_of_particle[copied]] * n_max + rank[copied]  # flat [row, slot]
    source = order[copied]
    mask = np.zeros((int(keep.sum()), n_max), dtype=bool)
    mask.reshape(-1)[destination] = True
    padded_columns = []
    for column in raw.columns:
        padded = np.zeros(mask.shape, dtype=column.dtype)
        padded.reshape(-1)[destination] = column[source]
        padded_columns.append(padded)
    with np.errstate(divide="ignore", invalid="ignore"):  # padding rows, set to zero below
        coordinates = raw.relative(*padded_columns, {name: values[keep] for name, values in raw.jet.items()})
    particles = np.empty((*mask.shape, len(coordinates)), dtype=np.float32)
    for feature, values in enumerate(coordinates):
        particles[..., feature] = np.where(mask, values, 0.0)
    finite_rows = np.isfinite(particles).all(axis=(1, 2))
    if not finite_rows.all():
        particles, mask = particles[finite_rows], mask[finite_rows]
    keep[keep] = finite_rows
    dropped = {
        "empty_jets": int(empty.sum()),
        "nonfinite_jets": int((~empty & ~finite).sum() + (~finite_rows).sum()),
        "unlabelled_jets": int((~empty & finite & ~labelled).sum()),
    }
    n_kept = np.minimum(counts[keep], n_max)
    jets = np.stack([raw.jet["pt"][keep], raw.jet["eta"][keep], raw.jet["mass"][keep], n_kept], axis=-1)
    arrays = {
        "particles": particles, "mask": mask,
        "jets": jets.astype(np.float32), "labels": raw.labels[keep].astype(np.int32),
    }
    return arrays, dropped


def split_counts(n_before: int, n_chunk: int, fractions) -> np.ndarray:
    """How many of a chunk's jets go to each split: differences of the rounded cumulative
    targets, so over all chunks each split gets exactly ``round(fraction * total)``."""
    cumulative = np.concatenate([[0.0], np.cumsum(fractions)])
    cumulative[-1] = 1.0

    def targets(n: int) -> np.ndarray:
        return np.floor(cumulative * n + 0.5).astype(np.int64)

    return np.diff(targets(n_before + n_chunk) - targets(n_before))


class RunningMoments:
    """Mean and standard deviation of feature columns, accumulated chunk by chunk in float64."""

    def __init__(self, names: list[str]):
        self.names, self.count = names, 0
        self.total = np.zeros(len(names))
        self.total_squares = np.zeros(len(names))

    def add(self, values: np.ndarray, count: int) -> None:
        """Add ``values[..., feature]`` of ``count`` entries; any other entries must be zero
        (padding), which adds nothing to the sums."""
        axes = tuple(range(values.ndim - 1))
        self.count += count
        self.total += values.sum(axis=axes, dtype=np.float64)
        self.total_squares += np.square(values, dtype=np.float64).sum(axis=axes)

    def summary(self) -> dict[str, dict[str, float]]:
        mean = self.total / max(self.count, 1)
        std = np.sqrt(np.maximum(self.total_squares / max(self.count, 1) - mean**2, 0.0))
        return {name: {"mean": float(m), "std": float(s)} for name, m, s in zip(self.names, mean, std)}


def sha256(path: Path) -> str:
    with open(path, "rb") as file:
        return hashlib.file_digest(file, "sha256").hexdigest()


def check_config(data: DictConfig) -> None:
    fractions = list(data.split_fractions)
    if len(fractions) != 3 or min(fractions) < 0 or not math.isclose(sum(fractions), 1.0, abs_tol=1e-6):
        raise PipelineError(f"data.split_fractions must be three non-negative numbers (train, val, test) summing to 1, not {fractions}.")
    if data.n_max < 1 or data.chunk_jets < 1:
        raise PipelineError("data.n_max and data.chunk_jets must be positive.")


def load_chunks(reader, plan: list[list[tuple[Path, int, int]]]) -> Iterator[tuple[list, int]]:
    """What the reader loads for each chunk of the plan (one item per file slice), and how many jets."""
    for pieces in plan:
        yield [reader.load(path, first, last) for path, first, last in pieces], sum(last - first for _, first, last in pieces)


def convert_chunk(reader, loaded_pieces: list, n_max: int) -> tuple[dict[str, np.ndarray], dict[str, int]]:
    """The sets arrays of a chunk's usable jets, and how many were dropped for which reason."""
    converted = [to_sets(reader.parse(loaded), n_max) for loaded in loaded_pieces]
    arrays = {name: np.concatenate([piece[name] for piece, _ in converted]) for name in converted[0][0]}
    dropped = {reason: sum(counts[reason] for _, counts in converted) for reason in DROP_REASONS}
    return arrays, dropped


def preprocess(cfg: DictConfig, processed_dir: Path, progress: bool = True) -> tuple[dict, list[dict]]:
    """Read every raw file of ``cfg.data``, write the three splits and ``normalisation.json`` into
    ``processed_dir``; return the counts (jets read, written per split, dropped, seconds) and the
    source files (name, SHA-256, jets)."""
    data = cfg.data
    check_config(data)
    reader = READERS[Source(data.source)](data)
    paths = raw_files(data)
    plan = chunk_plan(reader, paths, data.chunk_jets)
    sources = [{"file": path.name, "sha256": sha256(path), "jets": reader.n_jets(path)} for path in paths]
    particle_moments = RunningMoments(list(data.feature_names))
    jet_moments = RunningMoments(list(data.jet_feature_names))
    log_moments = RunningMoments(["pt_rel"])  # of log(pt_rel), for model.log_pt_rel
    counts = dict.fromkeys(["jets_read", *(f"jets_{split}" for split in SPLITS), *(f"dropped_{reason}" for reason in DROP_REASONS)], 0)
    start = time.perf_counter()
    with ExitStack() as files:
        writers = {
            split: files.enter_context(write_sets(
                processed_dir / f"{split}.h5", n_max=data.n_max, feature_names=data.feature_names,
                jet_feature_names=data.jet_feature_names, class_names=data.class_names, source=data.name,
                config=OmegaConf.to_yaml(cfg, resolve=True), source_files=sources,
            ))
            for split in SPLITS
        }
        bar = files.enter_context(tqdm(total=sum(reader.n_jets(path) for path in paths), unit="jet", desc="preprocess", disable=None if progress else True))
        # Reading (decompression), conversion (numpy) and writing (compression) overlap in three
        # threads, each at most one chunk ahead of the next; all three release the GIL for their
        # heavy work, so the stage runs at about the speed of its slowest step.
        stop = threading.Event()
        files.callback(stop.set)
        loaded_chunks = in_background(load_chunks(reader, plan), stop)
        chunks = in_background(((*convert_chunk(reader, loaded, data.n_max), n_read) for loaded, n_read in loaded_chunks), stop)
        for chunk_index, (arrays, dropped, n_read) in enumerate(chunks):
            counts["jets_read"] += n_read
            for reason, n in dropped.items():
                counts[f"dropped_{reason}"] += n
            n_jets = len(arrays["labels"])
            counts_per_split = split_counts(sum(counts[f"jets_{split}"] for split in SPLITS), n_jets, data.split_fractions)
            shuffled = np.random.default_rng([cfg.seed, chunk_index]).permutation(n_jets)
            for split, rows in zip(SPLITS, np.split(shuffled, np.cumsum(counts_per_split)[:-1])):
                split_arrays = {name: array[rows] for name, array in arrays.items()}
                writers[split].append(**split_arrays)
                counts[f"jets_{split}"] += len(rows)
                if split == "train":
                    particle_moments.add(split_arrays["particles"], int(split_arrays["mask"].sum()))  # padding is 0
                    pt_rel = split_arrays["particles"][..., data.feature_names.index("pt_rel")]
                    positive = split_arrays["mask"] & (pt_rel > 0)
                    log_moments.add(np.log(np.where(positive, pt_rel, 1.0))[..., None], int(positive.sum()))
                    jet_moments.add(split_arrays["jets"], len(rows))
            bar.update(n_read)
        if counts["jets_train"] == 0:
            raise PipelineError(f"no usable jets in {data.raw_dir} for classes {list(data.class_names)}; check data.class_names and data.labels.")
        for writer in writers.values():
            writer.attrs.update({f"dropped_{reason}": counts[f"dropped_{reason}"] for reason in DROP_REASONS})
        normalisation = {"particles": particle_moments.summary(), "log_particles": log_moments.summary(), "jets": jet_moments.summary(),
                         "n_train_particles": particle_moments.count, "n_train_jets": jet_moments.count}
    # Written once the three sets are in place: closing them flushes most of their bytes, the step
    # likeliest to fail, and the statistics must not describe sets that never arrived.
    with atomic_output(processed_dir / "normalisation.json") as file:
        json.dump(normalisation, file, indent=2)
    counts["seconds"] = time.perf_counter() - start
    return counts, sources


@hydra.main(config_path="conf", config_name="config", version_base="1.3")
def main(cfg: Config) -> None:
    with stage("preprocess", cfg, output_dir=cfg.data.processed_dir) as processed_dir:
        counts, sources = preprocess(cfg, processed_dir)
        mlflow.log_metrics({**counts, "jets_per_s": counts["jets_read"] / counts["seconds"]})
        mlflow.log_dict(sources, "source_files.json")
        print(
            f"preprocess: {counts['jets_read']} jets read, {counts['jets_train']}/{counts['jets_val']}/{counts['jets_test']} "
            f"written to {processed_dir}/{{train,val,test}}.h5; dropped: {counts['dropped_empty_jets']} empty, "
            f"{counts['dropped_nonfinite_jets']} non-finite, {counts['dropped_unlabelled_jets']} of other classes"
        )


if __name__ == "__main__":
    main()
