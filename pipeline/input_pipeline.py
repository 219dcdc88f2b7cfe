"""Batches from a processed split: normalised, shuffled, cut to their padding, sharded.

The model sees particle features standardised with the train split's ``normalisation.json``
(padding stays exactly zero) and, when it is conditioned on them, the standardised jet features as
context (``SetsSplit``: the rows of a split it was asked for, in host memory).

Training (``TrainBatches``) reads the train split a window at a time, so its memory does not grow
with the split: epoch ``e`` takes the file's HDF5 chunks in an order seeded by ``(seed, e)``, cuts
that stream into windows of ``train.window_jets`` jets, shuffles each window (seeded by ``(seed,
e, window)``) and cuts it into batches; the incomplete last batch of an epoch is dropped. The batch
sequence is a pure function of the seed, the step and the number of input shares (below): a
resumed run sees the same batches as an uninterrupted one.

Padding-aware batching: a batch is cut to the largest multiplicity among its sets, rounded up to
a bucket (``bucket_sizes``), so attention costs ~ n_used^2 instead of n_max^2 and only a few shapes
are ever compiled. Padded elements contribute nothing to the loss (``setdiff``), so a cut batch has
exactly the loss of the full one. A random batch of hundreds of jets almost always holds one near
the largest multiplicity, though; with ``multiplicity_window = w > 0`` each run of ``w`` batches of
a window is sorted by multiplicity before it is cut into batches, and the window's batches are then
taken in a seeded random order. Sets of similar size share a batch and the cut saves much more;
every set is still seen once per epoch (the usual bucketing by length).

With several processes (multi-host training), each window's stream is cut into ``S`` contiguous
shares (``train.input_shares``, by default one per process), each shuffled on its own into
``B/S`` columns of every global batch of ``B`` sets. Process ``p`` of ``P`` takes columns
``p*B/P`` to ``(p+1)*B/P``: with ``S = P`` that is its own share, so it reads only its share's
chunks of the file, not the window's. Every process computes the same bucket from the whole
batch's multiplicities. The rows are then split over the process's devices:
``[n_local_devices, B / (P * n_local_devices), ...]``. The global batches depend on ``S`` and on
nothing else about the processes or devices: one process run with ``input_shares=S`` sees the
batches of ``S`` processes.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Iterator

import numpy as np

from .files import PipelineError
from .jets import jet_from_relative_particles
from .sets import open_sets, read_multiplicities, read_sets, rows_per_chunk


def bucket_sizes(n_max: int, smallest: int = 8) -> list[int]:
    """Powers of two from ``smallest`` below ``n_max``, then ``n_max``: at most ~log2(n_max) shapes."""
    sizes = []
    size = smallest
    while size < n_max:
        sizes.append(size)
        size *= 2
    return [*sizes, n_max]


def padded_length(buckets: np.ndarray, largest: int) -> int:
    """The smallest of ``buckets`` (sorted) that holds a set of ``largest`` particles."""
    return int(buckets[np.searchsorted(buckets, largest)])


def batches_by_multiplicity(split: SetsSplit, rows: np.ndarray, batch_size: int) -> Iterator[tuple[np.ndarray, dict, int]]:
    """Every one of ``rows`` of ``split`` once, in batches of similar multiplicity, for inference.

    Yields ``(positions, batch, n_used)``: the positions in ``rows`` the batch holds, the batch
    (``split.rows``) cut to ``n_used``, its largest multiplicity rounded up to a bucket, and filled up
    to ``batch_size`` by repeating its last row, so every batch of a bucket has one shape (one
    compilation). Only the first ``len(positions)`` results of a batch are real.
    """
    by_size = np.argsort(split.multiplicity[rows], kind="stable")
    buckets = np.array(bucket_sizes(split.mask.shape[1]))
    for first in range(0, len(rows), batch_size):
        positions = by_size[first : first + batch_size]
        chunk = rows[positions]
        filled = np.concatenate([chunk, np.full(batch_size - len(chunk), chunk[-1])])
        n_used = padded_length(buckets, int(split.multiplicity[chunk].max()))
        yield positions, split.rows(filled, n_used), n_used


def _standardised_jet_columns(values: np.ndarray, statistics: list[dict]) -> np.ndarray:
    """``(values - mean) / std`` per column of jet-level ``values[jets, k]``, with the train split's
    ``{"mean", "std"}`` of each column; a column of zero spread (a constant) is only centred, to 0."""
    mean = np.array([entry["mean"] for entry in statistics], np.float32)
    std = np.array([entry["std"] for entry in statistics], np.float32)
    return ((values - mean) / np.where(std > 0, std, 1.0)).astype(np.float32)


class SetsSplit:
    """Rows of one split of a processed dataset (all, or the ``rows`` asked for), normalised for the model, in host memory.

    The model sees every particle feature standardised with the train split's statistics,
    ``x = (f - mean) / std``, where ``f`` is the feature itself or, with ``log_pt_rel``, ``log(pt_rel)``
    in place of ``pt_rel`` (its statistics are ``normalisation.json``'s ``log_particles``): the
    momentum fractions span three decades, and a model of their logarithm can only generate
    positive ones. Padding stays exactly zero.
    """

    def __init__(self, path: Path, normalisation_path: Path, use_context: bool, log_pt_rel: bool = False,
                 rows: np.ndarray | None = None, context_pt_rel_sum: bool = False, context_kept_mass: bool = False):
        sets = read_sets(path, rows=rows)  # only ``rows`` (increasing) of the file, if given
        normalisation = json.loads(Path(normalisation_path).read_text())
        self.feature_names, self.class_names = list(sets["feature_names"]), list(sets["class_names"])
        self.mask = sets["mask"]
        particles = sets["particles"]
        # Each jet's sum of momentum fractions (below 1 where the jet has more than n_max particles):
        # sampling gives it to the jet generated on this one's template.
        pt_rel = particles[..., self.feature_names.index("pt_rel")]
        self.pt_rel_sum = pt_rel.sum(axis=1, where=self.mask, dtype=np.float64)
        # The mass the kept particles add up to, m/pT of the original jet (massless particles, as the
        # evaluation computes it): model.context_kept_mass gives it in place of the whole jet's mass.
        if use_context and context_kept_mass:
            kept_relative_mass = jet_from_relative_particles(
                *(particles[..., self.feature_names.index(name)] for name in ("eta_rel", "phi_rel", "pt_rel")), self.mask)["mass"]
        statistics = [normalisation["particles"][name] for name in self.feature_names]
        self.log_column = self.feature_names.index("pt_rel") if log_pt_rel else None
        if log_pt_rel:
            if "log_particles" not in normalisation:
                raise PipelineError(f"{normalisation_path} has no statistics of log(pt_rel), which model.log_pt_rel needs; "
                                    "preprocess the dataset again.")
            pt_rel = particles[..., self.log_column]
            if (pt_rel[self.mask] <= 0).any():
                raise PipelineError(f"{path} holds particles with pt_rel <= 0, whose logarithm model.log_pt_rel cannot take; "
                                    "drop them or train with model.log_pt_rel=false.")
            particles[..., self.log_column] = np.log(np.where(self.mask, pt_rel, 1.0))
            statistics[self.log_column] = normalisation["log_particles"]["pt_rel"]
        mean = np.array([entry["mean"] for entry in statistics], np.float32)
        std = np.array([entry["std"] for entry in statistics], np.float32)
        if not (std > 0).all():
            raise PipelineError(f"{normalisation_path} has a zero standard deviation; the train split is degenerate, preprocess more jets.")
        self.particle_mean, self.particle_std = mean, std  # x = (features - mean) / std on real elements
        # In place: the split's bytes are held once, not once per step of the expression.
        particles -= mean
        particles /= std
        particles *= self.mask[..., None]
        self.x = particles
        self.labels = sets["labels"].astype(np.int32)
        self.multiplicity = self.mask.sum(axis=1)
        self.context, self.jet_feature_names = None, []
        if use_context:
            jet_names = self.jet_feature_names = list(sets["jet_feature_names"])
            if not set(jet_names) <= normalisation["jets"].keys():
                raise PipelineError(
                    f"{path} holds jet features {jet_names}, but the model is conditioned on {list(normalisation['jets'])}; "
                    "score a processed split (generated files hold relative jet features) or a model without model.use_jet_context."
                )
            jets, statistics = sets["jets"], [normalisation["jets"][name] for name in jet_names]
            if context_kept_mass:
                if not {"pt", "mass"} <= set(jet_names):
                    raise PipelineError(f"{path} holds jet features {jet_names}; model.context_kept_mass replaces the jet's "
                                        "mass by its kept particles' and needs pt and mass among them.")
                # Standardised with the whole jet mass's statistics: an affine map that is the same in
                # training and sampling, for a feature a little lighter than the jet's.
                jets = jets.copy()
                jets[:, jet_names.index("mass")] = jets[:, jet_names.index("pt")] * kept_relative_mass
                jet_names[jet_names.index("mass")] = "kept_mass"
            self.context = _standardised_jet_columns(jets, statistics)
            if context_pt_rel_sum:
                self.context = np.concatenate([self.context, self._standardised_pt_rel_sum(normalisation, normalisation_path)], axis=1)
                self.jet_feature_names.append("pt_rel_sum")
        elif context_pt_rel_sum or context_kept_mass:
            option = "model.context_pt_rel_sum adds the jets' momentum-fraction sums to" if context_pt_rel_sum else \
                "model.context_kept_mass changes the mass among"
            raise PipelineError(f"{option} their features, which a model without model.use_jet_context does not see; "
                                "set model.use_jet_context=true.")

    def _standardised_pt_rel_sum(self, normalisation: dict, normalisation_path: Path) -> np.ndarray:
        """Each jet's sum of pt_rel over its kept particles as a context column, standardised with the
        train split's statistics: how much of the jet's pT the particles past ``n_max`` took away."""
        if "kept_particles" not in normalisation:
            raise PipelineError(f"{normalisation_path} has no statistics of the jets' momentum-fraction sums, which "
                                "model.context_pt_rel_sum needs; preprocess the dataset again.")
        return _standardised_jet_columns(self.pt_rel_sum[:, None], [normalisation["kept_particles"]["pt_rel_sum"]])

    def to_physical(self, x: np.ndarray, mask: np.ndarray) -> np.ndarray:
        """The particle features of the model's ``x[jets, n, d]`` (the inverse of the normalisation),
        zero on padding."""
        features = np.where(mask[..., None], x * self.particle_std + self.particle_mean, 0.0)
        if self.log_column is not None:
            features[..., self.log_column] = np.where(mask, np.exp(features[..., self.log_column]), 0.0)
        return features

    def log_jacobian(self) -> np.ndarray:
        """``ln |d features / dx|`` of every jet of this split, summed over its real particles: what
        turns a density of the model's ``x`` into one of the particle features (``n sum ln std``,
        plus ``sum ln pt_rel`` with ``log_pt_rel``, since ``pt_rel = exp(std x + mean)``)."""
        per_jet = self.multiplicity * np.sum(np.log(self.particle_std.astype(np.float64)))
        if self.log_column is not None:
            log_pt_rel = self.x[..., self.log_column].astype(np.float64) * self.particle_std[self.log_column] + self.particle_mean[self.log_column]
            per_jet = per_jet + np.sum(np.where(self.mask, log_pt_rel, 0.0), axis=1)
        return per_jet

    def __len__(self) -> int:
        return len(self.labels)

    def rows(self, index: np.ndarray, n_used: int) -> dict[str, np.ndarray]:
        batch = {"x": self.x[index, :n_used], "mask": self.mask[index, :n_used], "labels": self.labels[index]}
        if self.context is not None:
            batch["context"] = self.context[index]
        return batch


class TrainBatches:
    """The batch of every training step, for this process and sharded over its devices, read from
    the train split a window at a time: memory holds one window of ``window_jets`` jets (divided
    among the processes), whatever the split's size.

    The plan of an epoch (``window_batches``): the file's HDF5 chunks (1 024 jets each, as
    ``pipeline.sets`` writes them) in an order seeded by ``(seed, epoch)`` make a stream of jets;
    the stream is cut into windows of ``window_jets`` jets (rounded down to whole batches, at least
    one), each window into ``input_shares`` contiguous shares, and each share's jets are shuffled
    (seeded by ``(seed, epoch, window)``) into its ``batch_size / input_shares`` columns of the
    window's batches. A batch so mixes jets of hundreds of chunks from all over the file; a split
    that fits in one window is shuffled whole. The plan is a pure function of the seed, the step
    and ``input_shares`` (by default ``process_count``), so a resumed run sees exactly the batches
    an uninterrupted one would. Process ``p`` of ``P`` reads only its columns' rows of each window:
    with one share per process, the chunks of its own share. The jets' multiplicities (2 bytes a
    jet) are read once, so that every process cuts each batch to the same bucket and
    ``multiplicity_window`` sorts within a window.
    """

    def __init__(self, path: Path, normalisation_path: Path, use_context: bool, log_pt_rel: bool, batch_size: int, seed: int,
                 n_local_devices: int, process_index: int = 0, process_count: int = 1, padding_aware: bool = True,
                 multiplicity_window: int = 0, window_jets: int = 262_144, input_shares: int = 0,
                 context_pt_rel_sum: bool = False, context_kept_mass: bool = False):
        n_devices = n_local_devices * process_count
        if batch_size % n_devices:
            raise PipelineError(
                f"train.batch_size={batch_size} does not divide over {n_devices} devices; choose a multiple of {n_devices}."
            )
        self.input_shares = input_shares or process_count
        if self.input_shares < 0 or batch_size % self.input_shares:
            raise PipelineError(
                f"train.batch_size={batch_size} does not divide into train.input_shares={self.input_shares} shares; "
                "choose a divisor of the batch size (0: one share per process)."
            )
        self.path, self.normalisation_path, self.use_context, self.log_pt_rel = path, normalisation_path, use_context, log_pt_rel
        self.context_pt_rel_sum, self.context_kept_mass = context_pt_rel_sum, context_kept_mass
        with open_sets(path) as file:
            mask = file["mask"]
            n_jets, self.n_max = mask.shape
            chunk_length = rows_per_chunk(mask)
            self.multiplicity = read_multiplicities(path, mask)
        self.batches_per_epoch = n_jets // batch_size
        if self.batches_per_epoch == 0:
            raise PipelineError(f"the train split has {n_jets} jets, fewer than train.batch_size={batch_size}; lower it.")
        self.batch_size, self.seed, self.multiplicity_window = batch_size, seed, multiplicity_window
        self.n_local_devices, self.process_index, self.process_count = n_local_devices, process_index, process_count
        self.batches_per_window = max(window_jets // batch_size, 1)
        self.chunk_starts = np.arange(0, n_jets, chunk_length)
        self.chunk_lengths = np.minimum(chunk_length, n_jets - self.chunk_starts)
        self._window_key, self._window_split, self._window_rows, self._window_batches = None, None, None, None
        self.buckets = np.array(bucket_sizes(self.n_max) if padding_aware else [self.n_max])

    def stream_rows(self, epoch: int, first: int, last: int) -> np.ndarray:
        """File rows at positions ``first`` to ``last`` of epoch ``epoch``'s stream (its chunks in seeded order)."""
        order = np.random.default_rng([self.seed, epoch]).permutation(len(self.chunk_starts))
        lengths = self.chunk_lengths[order]
        ends = np.cumsum(lengths)
        positions = np.arange(first, last)
        chunk = np.searchsorted(ends, positions, side="right")
        return self.chunk_starts[order[chunk]] + positions - (ends[chunk] - lengths[chunk])

    def window_batches(self, epoch: int, window: int) -> np.ndarray:
        """``[batches, batch_size]`` file rows of window ``window`` of epoch ``epoch`` (the epoch's
        incomplete last batch dropped): share ``s`` of the window's stream, shuffled, fills columns
        ``s * batch_size / input_shares`` onwards. With ``multiplicity_window``, each share's runs
        are sorted by multiplicity and the batches then taken in one seeded order, so the columns of
        a batch hold sets of similar size in every share."""
        first_batch = window * self.batches_per_window
        n_batches = min(self.batches_per_window, self.batches_per_epoch - first_batch)
        first = first_batch * self.batch_size
        last = len(self.multiplicity) if first_batch + n_batches == self.batches_per_epoch else first + n_batches * self.batch_size
        stream = self.stream_rows(epoch, first, last)
        share_width = self.batch_size // self.input_shares
        bounds = len(stream) * np.arange(self.input_shares + 1) // self.input_shares
        rng = np.random.default_rng([self.seed, epoch, window])
        columns = []
        for share_first, share_last in zip(bounds[:-1], bounds[1:]):
            rows = stream[share_first:share_last]
            rows = rows[rng.permutation(len(rows))][: n_batches * share_width]
            if self.multiplicity_window > 0:
                run = self.multiplicity_window * share_width
                for start in range(0, len(rows), run):
                    run_rows = rows[start : start + run]
                    rows[start : start + run] = run_rows[np.argsort(self.multiplicity[run_rows], kind="stable")]
            columns.append(rows.reshape(n_batches, share_width))
        batches = np.concatenate(columns, axis=1)
        return batches[rng.permutation(n_batches)] if self.multiplicity_window > 0 else batches

    def global_rows(self, step: int) -> np.ndarray:
        """File rows of the global batch of ``step``."""
        epoch, position = divmod(step, self.batches_per_epoch)
        window, index = divmod(position, self.batches_per_window)
        self._load_window(epoch, window)
        return self._window_batches[index]

    def process_rows(self, step: int) -> np.ndarray:
        """File rows of this process's part of the batch of ``step``."""
        return self._own(self.global_rows(step))

    def _own(self, rows: np.ndarray) -> np.ndarray:
        """This process's part of a global batch's ``rows``."""
        per_process = self.batch_size // self.process_count
        return rows[..., self.process_index * per_process : (self.process_index + 1) * per_process]

    def _load_window(self, epoch: int, window: int) -> None:
        if self._window_key == (epoch, window):
            return
        self._window_batches = self.window_batches(epoch, window)
        rows = np.unique(self._own(self._window_batches))
        if self._window_split is None or not np.array_equal(rows, self._window_rows):  # else a split in one window: read once
            self._window_key, self._window_split = None, None  # the old window's memory goes before the new one is read
            self._window_split = SetsSplit(self.path, self.normalisation_path, self.use_context, self.log_pt_rel, rows=rows,
                                           context_pt_rel_sum=self.context_pt_rel_sum, context_kept_mass=self.context_kept_mass)
            self._window_rows = rows
        self._window_key = (epoch, window)

    def __call__(self, step: int) -> dict[str, np.ndarray]:
        rows = self.global_rows(step)
        n_used = padded_length(self.buckets, int(self.multiplicity[rows].max()))
        positions = np.searchsorted(self._window_rows, self._own(rows))  # in the window's rows read by this process
        batch = self._window_split.rows(positions, n_used)
        return {name: array.reshape(self.n_local_devices, -1, *array.shape[1:]) for name, array in batch.items()}
