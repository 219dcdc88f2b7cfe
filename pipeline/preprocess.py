"""Preprocess stage: raw jet files of any source -> padded sets with masks (``pipeline.sets``).

``python -m pipeline.preprocess data=<name>`` reads ``data.raw_dir`` and writes
``data.processed_dir/{train,val,test}.h5`` and ``normalisation.json``. A jet's way through it:

1. A reader (``pipeline.readers``, one per format) loads a slice of a raw file (I/O) and parses it into flat per-particle arrays, jet
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

With ``data.preprocess_shards = K > 1`` the raw files are dealt round-robin into K groups, and each
group goes through steps 1-5 on its own (``data.preprocess_shard=k``: one job per group) into
``shards/<split>-<k>-of-<K>.h5``, with its train split's sums in ``shards/moments-<k>-of-<K>.json``.
Joining them (``data.preprocess_join``) writes each split as a sets file that maps its shards' rows
(``pipeline.sets.write_joined_sets``) and merges the sums into ``normalisation.json``.
"""

from __future__ import annotations

import json
import math
import time
import threading
from contextlib import ExitStack
from pathlib import Path
from typing import Iterator

import awkward as ak
import hydra
import mlflow
import numpy as np
from omegaconf import DictConfig, OmegaConf
from tqdm import tqdm

from .background import in_background
from .download import archive_members
from .config import SHARDS_FOLDER, Config, Source, jetnet_file_name, processed_shard_stem, pythia_shard_stem
from .readers import READERS, UNLABELLED, RawJets, per_jet_sum
from .sets import write_joined_sets, write_sets
from .files import PipelineError, atomic_output, file_sha256
from .stage import stage
from .tracking import READ, WRITTEN, FileDataset, log_files

SPLITS = ("train", "val", "test")
DROP_REASONS = ("empty_jets", "nonfinite_jets", "unlabelled_jets")


def raw_files(data: DictConfig) -> list[Path]:
    """The raw files of a dataset, in a fixed order; each must exist."""
    raw_dir, source = Path(data.raw_dir), Source(data.source)
    if source == Source.pythia:
        names = [f"{pythia_shard_stem(name, shard)}.root" for name in data.class_names for shard in range(data.generator.n_shards)]
        remedy = "python -m pipeline.generate"
    elif source == Source.jetnet:
        names = [jetnet_file_name(data.labels, name) for name in data.class_names]
        remedy = "python -m pipeline.download"
    else:
        remedy = "python -m pipeline.download"
        names = []
        for name, remote in data.files.items():
            members = archive_members(raw_dir, name, remote) if remote.members else [name]
            if members is None:
                raise PipelineError(f"the members of {name} are given as patterns and are known once it is extracted; "
                                    f"run `{remedy} data={data.name}` first.")
            names += members
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

    def state(self) -> dict:
        """The sums, to merge with another part's (``merge``) once every part is done."""
        return {"count": self.count, "total": self.total.tolist(), "total_squares": self.total_squares.tolist()}

    def merge(self, state: dict) -> None:
        self.count += state["count"]
        self.total += np.asarray(state["total"])
        self.total_squares += np.asarray(state["total_squares"])

    def summary(self) -> dict[str, dict[str, float]]:
        mean = self.total / max(self.count, 1)
        std = np.sqrt(np.maximum(self.total_squares / max(self.count, 1) - mean**2, 0.0))
        return {name: {"mean": float(m), "std": float(s)} for name, m, s in zip(self.names, mean, std)}


def train_moments(data: DictConfig) -> dict[str, RunningMoments]:
    """The statistics ``normalisation.json`` holds, to accumulate over the train split: of the particle
    features, of ``log(pt_rel)`` (for ``model.log_pt_rel``), of the jet features and of each jet's sum
    of ``pt_rel`` over its kept particles (for ``model.context_pt_rel_sum``)."""
    return {"particles": RunningMoments(list(data.feature_names)), "log_particles": RunningMoments(["pt_rel"]),
            "jets": RunningMoments(list(data.jet_feature_names)), "kept_particles": RunningMoments(["pt_rel_sum"])}


def check_config(data: DictConfig) -> None:
    fractions = list(data.split_fractions)
    if len(fractions) != 3 or min(fractions) < 0 or not math.isclose(sum(fractions), 1.0, abs_tol=1e-6):
        raise PipelineError(f"data.split_fractions must be three non-negative numbers (train, val, test) summing to 1, not {fractions}.")
    if data.n_max < 1 or data.chunk_jets < 1:
        raise PipelineError("data.n_max and data.chunk_jets must be positive.")
    if data.preprocess_shards == 1 and (data.preprocess_shard is not None or data.preprocess_join):
        raise PipelineError("data.preprocess_shard and data.preprocess_join need data.preprocess_shards > 1; "
                            "without shards, preprocess the whole dataset at once.")


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


def shard_groups(paths: list[Path], n_shards: int) -> list[list[Path]]:
    """The raw files of each preprocessing shard, dealt round-robin: with one file per class and
    shard (``g_000``, ``g_001``, ..., ``t_001``) shard k takes the k-th file of every class."""
    if n_shards < 1 or n_shards > len(paths):
        raise PipelineError(f"data.preprocess_shards={n_shards}, but the dataset has {len(paths)} raw files; "
                            f"choose between 1 and {len(paths)}.")
    return [paths[shard::n_shards] for shard in range(n_shards)]


def preprocess_files(cfg: DictConfig, reader, paths: list[Path], outputs: dict[str, Path], seed_key: list[int],
                     progress: bool) -> tuple[dict, list[dict], dict[str, RunningMoments]]:
    """Read ``paths`` and write the three splits to ``outputs[split]``; return the counts (jets read,
    written per split, dropped), the source files (name, SHA-256, jets) and the train split's moments.
    Chunk ``i`` is dealt to the splits by a permutation seeded with ``[seed, *seed_key, i]``."""
    data = cfg.data
    plan = chunk_plan(reader, paths, data.chunk_jets)
    sources = [{"file": path.name, "sha256": file_sha256(path), "jets": reader.n_jets(path)} for path in paths]
    moments = train_moments(data)
    counts = dict.fromkeys(["jets_read", *(f"jets_{split}" for split in SPLITS), *(f"dropped_{reason}" for reason in DROP_REASONS)], 0)
    with ExitStack() as files:
        writers = {
            split: files.enter_context(write_sets(
                outputs[split], n_max=data.n_max, feature_names=data.feature_names,
                jet_feature_names=data.jet_feature_names, class_names=data.class_names, source=data.name,
                config=OmegaConf.to_yaml(cfg, resolve=True), source_files=sources,
            ))
            for split in SPLITS
        }
        bar = files.enter_context(tqdm(total=sum(source["jets"] for source in sources), unit="jet", desc="preprocess",
                                       disable=None if progress else True))
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
            shuffled = np.random.default_rng([cfg.seed, *seed_key, chunk_index]).permutation(n_jets)
            for split, rows in zip(SPLITS, np.split(shuffled, np.cumsum(counts_per_split)[:-1])):
                split_arrays = {name: array[rows] for name, array in arrays.items()}
                writers[split].append(**split_arrays)
                counts[f"jets_{split}"] += len(rows)
                if split == "train":
                    moments["particles"].add(split_arrays["particles"], int(split_arrays["mask"].sum()))  # padding is 0
                    pt_rel = split_arrays["particles"][..., data.feature_names.index("pt_rel")]
                    positive = split_arrays["mask"] & (pt_rel > 0)
                    moments["log_particles"].add(np.log(np.where(positive, pt_rel, 1.0))[..., None], int(positive.sum()))
                    moments["jets"].add(split_arrays["jets"], len(rows))
                    moments["kept_particles"].add(pt_rel.sum(axis=1, where=split_arrays["mask"], dtype=np.float64)[:, None], len(rows))
            bar.update(n_read)
        if counts["jets_train"] == 0:
            raise PipelineError(f"no usable jets in {', '.join(source['file'] for source in sources)} of {data.raw_dir} for classes "
                                f"{list(data.class_names)}; check data.class_names and data.labels, or use fewer data.preprocess_shards.")
        for writer in writers.values():
            writer.attrs.update({f"dropped_{reason}": counts[f"dropped_{reason}"] for reason in DROP_REASONS})
    return counts, sources, moments


def write_normalisation(path: Path, moments: dict[str, RunningMoments]) -> None:
    normalisation = {name: moments[name].summary() for name in ("particles", "log_particles", "jets", "kept_particles")}
    normalisation.update(n_train_particles=moments["particles"].count, n_train_jets=moments["jets"].count)
    with atomic_output(path) as file:
        json.dump(normalisation, file, indent=2)


def shard_outputs(processed_dir: Path, shard: int, n_shards: int) -> dict[str, Path]:
    """Where preprocessing shard ``shard`` writes its splits (``train``, ...) and its ``moments``."""
    folder, stem = processed_dir / SHARDS_FOLDER, processed_shard_stem(shard, n_shards)
    return {**{split: folder / f"{split}-{stem}.h5" for split in SPLITS}, "moments": folder / f"moments-{stem}.json"}


def preprocess(cfg: DictConfig, processed_dir: Path, progress: bool = True) -> tuple[dict, list[dict], list[FileDataset], list[FileDataset]]:
    """Preprocess ``cfg.data`` into ``processed_dir``: every raw file into the three splits and
    ``normalisation.json``, or with ``data.preprocess_shards`` > 1 each group of raw files into its
    shards (all, or ``data.preprocess_shard`` only), then, unless one shard was asked for, the shards
    joined into the splits (``data.preprocess_join``: only that). Returns the counts (jets read,
    written per split, dropped, seconds), the raw files behind them (name, SHA-256, jets), and the
    files read and written (for MLflow)."""
    data = cfg.data
    check_config(data)
    start = time.perf_counter()
    reader = READERS[Source(data.source)](data)
    n_shards = data.preprocess_shards
    paths = raw_files(data)
    splits = {split: processed_dir / f"{split}.h5" for split in SPLITS}
    if n_shards == 1:
        counts, sources, moments = preprocess_files(cfg, reader, paths, splits, [], progress)
        # Written once the three sets are in place: closing them flushes most of their bytes, the
        # step likeliest to fail, and the statistics must not describe sets that never arrived.
        write_normalisation(processed_dir / "normalisation.json", moments)
        return ({**counts, "seconds": time.perf_counter() - start}, sources, raw_datasets(paths, sources),
                split_datasets(splits, counts, processed_dir / "normalisation.json"))
    groups = shard_groups(paths, n_shards)
    if data.preprocess_shard is not None and not 0 <= data.preprocess_shard < n_shards:
        raise PipelineError(f"data.preprocess_shard={data.preprocess_shard} is not one of the {n_shards} shards (0 to {n_shards - 1}).")
    if data.preprocess_join:
        to_write = []
    else:
        to_write = [data.preprocess_shard] if data.preprocess_shard is not None else range(n_shards)
    read, written = [], []
    for shard in to_write:
        outputs = shard_outputs(processed_dir, shard, n_shards)
        counts, sources, moments = preprocess_files(cfg, reader, groups[shard], outputs, [shard], progress)
        with atomic_output(outputs["moments"]) as file:
            json.dump({"counts": counts, "sources": sources, **{name: part.state() for name, part in moments.items()}}, file)
        read += raw_datasets(groups[shard], sources)
        written += split_datasets(outputs, counts, outputs["moments"])
    if data.preprocess_shard is not None:
        return {**counts, "seconds": time.perf_counter() - start}, sources, read, written
    counts, sources, shards_read = join_shards(cfg, processed_dir, n_shards)
    read = read or shards_read  # joined only: it read the shards
    return ({**counts, "seconds": time.perf_counter() - start}, sources, read,
            split_datasets(splits, counts, processed_dir / "normalisation.json"))


def raw_datasets(paths: list[Path], sources: list[dict]) -> list[FileDataset]:
    """The raw files read, with the checksums and jet counts already taken."""
    return [FileDataset(path, source["jets"], source["sha256"]) for path, source in zip(paths, sources)]


def split_datasets(splits: dict[str, Path], counts: dict, statistics: Path) -> list[FileDataset]:
    """The three splits written (with their jets) and the file of their statistics."""
    return [*(FileDataset(splits[split], counts[f"jets_{split}"]) for split in SPLITS), FileDataset(statistics)]


def join_shards(cfg: DictConfig, processed_dir: Path, n_shards: int) -> tuple[dict, list[dict], list[FileDataset]]:
    """Join the shards of every split into one sets file (``pipeline.sets.write_joined_sets``) and merge
    their statistics into ``normalisation.json``; returns the summed counts, the sources and the shard
    files read (each hashed once)."""
    data = cfg.data
    parts = []
    for shard in range(n_shards):
        outputs = shard_outputs(processed_dir, shard, n_shards)
        for path in outputs.values():
            if not path.is_file():
                raise PipelineError(f"{path} does not exist; preprocess shard {shard} first "
                                    f"(`python -m pipeline.preprocess data={data.name} data.preprocess_shard={shard}`).")
        parts.append((outputs, json.loads(outputs["moments"].read_text())))
    counts = {name: sum(part["counts"][name] for _, part in parts) for name in parts[0][1]["counts"]}
    sources = [source for _, part in parts for source in part["sources"]]
    moments = train_moments(data)
    for _, part in parts:
        for name, running in moments.items():
            running.merge(part[name])
    digests = {path: file_sha256(path) for outputs, _ in parts for path in outputs.values()}
    with ExitStack() as joined:
        for split in SPLITS:
            shards = [outputs[split] for outputs, _ in parts]
            joined.enter_context(write_joined_sets(
                processed_dir / f"{split}.h5", shards, source_files=sources, config=OmegaConf.to_yaml(cfg, resolve=True),
                shards=[{"file": str(path.relative_to(processed_dir)), "sha256": digests[path]} for path in shards],
                **{f"dropped_{reason}": counts[f"dropped_{reason}"] for reason in DROP_REASONS},
            ))
    write_normalisation(processed_dir / "normalisation.json", moments)
    read = [FileDataset(path, part["counts"].get(f"jets_{name}"), digests[path]) for outputs, part in parts for name, path in outputs.items()]
    return counts, sources, read


@hydra.main(config_path="conf", config_name="config", version_base="1.3")
def main(cfg: Config) -> None:
    data = cfg.data
    shard, n_shards = data.preprocess_shard, data.preprocess_shards
    label = (f"shard {shard}/{n_shards}" if shard is not None else "join" if data.preprocess_join else None) if n_shards > 1 else None
    config_file = f"{SHARDS_FOLDER}/config-{processed_shard_stem(shard, n_shards)}.yaml" if label and shard is not None else "config.yaml"
    with stage("preprocess", cfg, output_dir=data.processed_dir, config_file=config_file, label=label) as processed_dir:
        counts, sources, read, written = preprocess(cfg, processed_dir)
        mlflow.log_metrics({**counts, "jets_per_s": counts["jets_read"] / counts["seconds"]})
        mlflow.log_dict(sources, "source_files.json")
        log_files(READ, read)
        log_files(WRITTEN, written)
        outputs = (f"{processed_dir / SHARDS_FOLDER}/{{train,val,test}}-{processed_shard_stem(shard, n_shards)}.h5" if shard is not None
                   else f"{processed_dir}/{{train,val,test}}.h5")
        print(
            f"preprocess: {counts['jets_read']} jets read, {counts['jets_train']}/{counts['jets_val']}/{counts['jets_test']} "
            f"written to {outputs}; dropped: {counts['dropped_empty_jets']} empty, "
            f"{counts['dropped_nonfinite_jets']} non-finite, {counts['dropped_unlabelled_jets']} of other classes"
        )


if __name__ == "__main__":
    main()
