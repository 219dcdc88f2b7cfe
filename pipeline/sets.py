"""The sets file: one HDF5 layout for processed splits and generated samples.

=========== ======= ======================== ==========================================
dataset     dtype   shape                    meaning
=========== ======= ======================== ==========================================
particles   float32 [n_jets, n_max, n_feat]  physical units; padded rows are 0
mask        bool    [n_jets, n_max]          True for a real particle
jets        float32 [n_jets, n_jet_feat]     jet-level features
labels      int32   [n_jets]                 class index into ``class_names``
=========== ======= ======================== ==========================================

Attributes: ``feature_names``, ``jet_feature_names``, ``class_names``, ``schema_version``,
``source``, ``config`` (the resolved YAML that made the file), plus whatever the writer adds
(``pipeline.preprocess`` records its source files with their SHA-256 and what it dropped).
Particles are sorted by decreasing ``pt_rel``. Files are written chunked, compressed and
checksummed (a damaged chunk fails its checksum when read, and the file is refused), and appear only
when complete (written under a temporary name, renamed at the end).

A large split may be written as shards, each a sets file, and joined by a sets file whose four
datasets are HDF5 virtual datasets mapping the shards' rows one after the other
(:func:`write_joined_sets`; shard paths are stored relative to it, so the folder can move). It
reads like any other; one whose shard is missing is refused (HDF5 would read its rows as fill values).
"""

from __future__ import annotations

import json
import os
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import h5py
import numpy as np

from .files import PipelineError, atomic_path

SCHEMA_VERSION = 1
DATASETS = ("particles", "mask", "jets", "labels")
ROWS_PER_CHUNK = 1024  # HDF5 chunk length along the jet axis
# LZF (bundled with h5py and PyTables) with byte shuffling: 3x faster to write than gzip level 1
# for 10% more bytes (benchmarks/README.md). Every chunk carries a Fletcher-32 checksum, checked
# when it is read: LZF decodes damaged bytes into wrong numbers without complaint.
COMPRESSION = {"compression": "lzf", "shuffle": True, "fletcher32": True}


class SetsWriter:
    """Appends batches of jets to an open sets file (see :func:`write_sets`)."""

    def __init__(self, file: h5py.File, n_max: int, n_features: int, n_jet_features: int):
        shapes = {
            "particles": ((n_max, n_features), np.float32),
            "mask": ((n_max,), np.bool_),
            "jets": ((n_jet_features,), np.float32),
            "labels": ((), np.int32),
        }
        self.datasets = {
            name: file.create_dataset(
                name, shape=(0, *shape), maxshape=(None, *shape), dtype=dtype,
                chunks=(ROWS_PER_CHUNK, *shape), **COMPRESSION,
            )
            for name, (shape, dtype) in shapes.items()
        }
        self.attrs = file.attrs
        self.n_jets = 0

    def append(self, particles: np.ndarray, mask: np.ndarray, jets: np.ndarray, labels: np.ndarray) -> None:
        arrays = {"particles": particles, "mask": mask, "jets": jets, "labels": labels}
        count = len(labels)
        for name, array in arrays.items():
            dataset = self.datasets[name]
            dataset.resize(self.n_jets + count, axis=0)
            dataset[self.n_jets :] = array
        self.n_jets += count


@contextmanager
def write_sets(path, *, n_max: int, feature_names, jet_feature_names, class_names, source: str,
               config: str, **attributes) -> Iterator[SetsWriter]:
    """Write a sets file: yields a :class:`SetsWriter`; the file appears at ``path`` only when the
    block completes. Extra ``attributes`` are stored as file attributes (dicts and lists as JSON)."""
    with atomic_path(path) as temporary, h5py.File(temporary, "w") as file:
        file.attrs.update(
            feature_names=list(feature_names), jet_feature_names=list(jet_feature_names),
            class_names=list(class_names), schema_version=SCHEMA_VERSION, source=source, config=config,
        )
        for name, value in attributes.items():
            file.attrs[name] = json.dumps(value) if isinstance(value, (dict, list)) else value
        yield SetsWriter(file, n_max, len(feature_names), len(jet_feature_names))


@contextmanager
def write_joined_sets(path, shard_paths: list[Path], **attributes) -> Iterator[None]:
    """Write a sets file at ``path`` that joins the sets files ``shard_paths`` (one schema, read in
    this order) through virtual datasets, with the first shard's attributes updated by ``attributes``
    (dicts and lists as JSON). The file appears when the block completes."""
    path = Path(path)
    shapes = {}
    with open_sets(shard_paths[0]) as first:
        inherited = dict(first.attrs)
        for name in DATASETS:
            shapes[name] = (first[name].shape[1:], first[name].dtype)
    layouts, lengths = {}, []
    for shard in shard_paths:
        with open_sets(shard) as file:
            lengths.append(len(file["labels"]))
            for name, (shape, dtype) in shapes.items():
                if (file[name].shape[1:], file[name].dtype) != (shape, dtype):
                    raise PipelineError(f"{shard} holds {name} of shape {file[name].shape[1:]}, the other shards {shape}; "
                                        "preprocess every shard with the same settings.")
    offsets = np.concatenate([[0], np.cumsum(lengths)])
    for name, (shape, dtype) in shapes.items():
        layout = h5py.VirtualLayout(shape=(int(offsets[-1]), *shape), dtype=dtype)
        for shard, start, stop in zip(shard_paths, offsets[:-1], offsets[1:]):
            relative = os.path.relpath(Path(shard).resolve(), path.parent.resolve())
            layout[start:stop] = h5py.VirtualSource(relative, name, shape=(stop - start, *shape))
        layouts[name] = layout
    with atomic_path(path) as temporary, h5py.File(temporary, "w") as file:
        for name, layout in layouts.items():
            file.create_virtual_dataset(name, layout, fillvalue=-1 if name == "labels" else 0)
        file.attrs.update(inherited)
        for name, value in attributes.items():
            file.attrs[name] = json.dumps(value) if isinstance(value, (dict, list)) else value
        yield


def rows_per_chunk(dataset: h5py.Dataset) -> int:
    """The jets of one HDF5 chunk of ``dataset``, the unit in which it is best read: a joined
    dataset reads its shards' chunks (``ROWS_PER_CHUNK``); an unchunked one is one chunk."""
    if dataset.chunks:
        return dataset.chunks[0]
    return ROWS_PER_CHUNK if dataset.is_virtual else max(len(dataset), 1)


def count_jets(path) -> int:
    """How many jets the sets file ``path`` holds (reads its shape, not its data)."""
    with h5py.File(path, "r") as file:
        return file["labels"].shape[0]


@contextmanager
def open_sets(path) -> Iterator[h5py.File]:
    """The sets file ``path`` open for reading. Refuses a file that is not a sets file of this schema
    version, saying which."""
    path = Path(path)
    try:
        file = h5py.File(path, "r")
    except OSError as error:
        raise PipelineError(f"{path} is not a readable HDF5 sets file ({error}); rerun the stage that makes it.") from None
    with file:
        missing = [name for name in DATASETS if name not in file]
        if missing:
            raise PipelineError(f"{path} has no dataset {missing[0]!r}, so it is not a sets file; rerun the stage that makes it.")
        version = file.attrs.get("schema_version")
        if version != SCHEMA_VERSION:
            raise PipelineError(
                f"{path} has schema_version {version}, this code reads {SCHEMA_VERSION}; rerun the stage that makes it."
            )
        for name in DATASETS:
            if file[name].is_virtual:
                for source in file[name].virtual_sources():
                    if not (path.parent / source.file_name).is_file():
                        raise PipelineError(f"{path} joins shards, and its shard {path.parent / source.file_name} does not exist; "
                                            "rerun the stage that makes them.")
        yield file


def damaged(path, dataset: h5py.Dataset, error: OSError, rows: tuple[int, int] | None = None) -> PipelineError:
    """The error for a sets file whose ``dataset`` failed to read (checksum or decompression), in
    ``rows`` (start, stop) if known; of a joined file, the shard whose rows fail to read is named."""
    name = dataset.name.lstrip("/")
    where = Path(path)
    if dataset.is_virtual and rows is not None:
        for source in dataset.virtual_sources():
            (first, *_), (last, *_) = source.vspace.get_select_bounds()
            start, stop = max(rows[0], first), min(rows[1], last + 1)
            if start >= stop:
                continue
            shard = Path(path).parent / source.file_name
            try:
                with h5py.File(shard, "r") as file:
                    file[source.dset_name][start - first : stop - first]
            except OSError:
                where = shard
                break
    return PipelineError(f"{where} is damaged: a chunk of its {name!r} data fails its checksum or does not decompress "
                         f"({error}); rerun the stage that makes it.")


def read_sets(path, datasets=DATASETS, rows: np.ndarray | None = None) -> dict:
    """The ``datasets`` (default: every one) and every attribute of a sets file, as numpy arrays and
    Python values; only the jets ``rows`` (increasing indices) if given, read one HDF5 chunk at a
    time, so memory holds the rows and one chunk, not the file.

    Refuses a file that is not a sets file of this schema version, or a damaged one, saying which.
    """
    with open_sets(path) as file:
        sets = {}
        for name in datasets:
            sets[name] = read_all(path, file[name]) if rows is None else read_rows(path, file[name], rows)
        for name, value in file.attrs.items():
            sets[name] = [str(item) for item in value] if isinstance(value, np.ndarray) else value
    return sets


def read_all(path, dataset: h5py.Dataset) -> np.ndarray:
    """Every row of ``dataset`` of the sets file ``path``, chunk by chunk (so a damaged one is named)."""
    values = np.empty(dataset.shape, dataset.dtype)
    chunk_length = rows_per_chunk(dataset)
    for start in range(0, len(dataset), chunk_length):
        try:
            values[start : start + chunk_length] = dataset[start : start + chunk_length]
        except OSError as error:
            raise damaged(path, dataset, error, (start, start + chunk_length)) from None
    return values


def read_rows(path, dataset: h5py.Dataset, rows: np.ndarray) -> np.ndarray:
    """``dataset[rows]`` (of the sets file ``path``) for increasing ``rows``, decompressing only the
    chunks that hold them, each once."""
    rows = np.asarray(rows, dtype=np.int64)
    if len(rows) and (np.any(np.diff(rows) <= 0) or rows[0] < 0 or rows[-1] >= len(dataset)):
        raise ValueError(f"rows must increase and lie within the {len(dataset)} jets of {dataset.name}")
    selected = np.empty((len(rows), *dataset.shape[1:]), dataset.dtype)
    chunk_length = rows_per_chunk(dataset)
    chunk_starts = np.arange(0, len(dataset) + chunk_length, chunk_length)
    bounds = np.searchsorted(rows, chunk_starts)  # rows[bounds[i]:bounds[i + 1]] fall in chunk i
    for start, first, last in zip(chunk_starts, bounds[:-1], bounds[1:]):
        if last > first:
            try:
                chunk = dataset[start : start + chunk_length]
            except OSError as error:
                raise damaged(path, dataset, error, (start, start + chunk_length)) from None
            selected[first:last] = chunk[rows[first:last] - start]
    return selected


def read_multiplicities(path, mask: h5py.Dataset) -> np.ndarray:
    """The number of real particles of every jet of the sets file ``path`` (its open ``mask``), as
    ``uint16``, read one HDF5 chunk at a time."""
    chunk_length = rows_per_chunk(mask)
    multiplicity = np.empty(len(mask), np.uint16)
    for start in range(0, len(mask), chunk_length):
        try:
            multiplicity[start : start + chunk_length] = mask[start : start + chunk_length].sum(axis=1)
        except OSError as error:
            raise damaged(path, mask, error, (start, start + chunk_length)) from None
    return multiplicity
