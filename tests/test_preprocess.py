"""Preprocessing: every source format to the sets file, value by value; splits; normalisation; bad input."""

import json

import h5py
import numpy as np
import pytest
from energyflow import pids2ms

from conftest import compose_config, run_stage
from jet_files import (
    EMPTY_JET, NAN_JET, expected_sets, random_jets, sort_by_jet_pt, write_jetnet, write_quark_gluon,
    write_root, write_toptagging,
)
from pipeline.jets import four_momentum_from_pt_y_phi
from pipeline.preprocess import preprocess, split_counts
from pipeline.sets import read_sets
from pipeline.files import PipelineError

N_MAX = 8  # below the fixtures' largest multiplicity (14), so truncation happens
SPLITS = ("train", "val", "test")
CLASSES = ["g", "q", "t"]


def run(tmp_path, *overrides, chunk_jets=7):
    """Preprocess in-process; return the counts and the three splits."""
    cfg = compose_config(
        f"data.raw_dir={tmp_path / 'raw'}", f"data.processed_dir={tmp_path / 'processed'}",
        f"data.n_max={N_MAX}", f"data.chunk_jets={chunk_jets}", *overrides,
    )
    counts = preprocess(cfg, tmp_path / "processed", progress=False)[0]
    return counts, {split: read_sets(tmp_path / "processed" / f"{split}.h5") for split in SPLITS}


def all_splits(splits: dict) -> dict:
    return sort_by_jet_pt({name: np.concatenate([splits[split][name] for split in SPLITS]) for name in ("particles", "mask", "jets", "labels")})


def assert_matches(got: dict, expected: dict):
    assert got["labels"].tolist() == expected["labels"].tolist()
    np.testing.assert_array_equal(got["mask"], expected["mask"])
    np.testing.assert_allclose(got["particles"], expected["particles"], rtol=1e-4, atol=2e-5)
    np.testing.assert_allclose(got["jets"], expected["jets"], rtol=1e-4, atol=1e-3)


@pytest.fixture
def root_jets(tmp_path):
    """Pythia-style ROOT files (one per class, JetClass layout), like pipeline.generate writes."""
    rng = np.random.default_rng(1)
    (tmp_path / "raw").mkdir()
    jets, labels = [], []
    for index, name in enumerate(CLASSES):
        class_jets = random_jets(rng, 10)
        write_root(tmp_path / "raw" / f"{name}_000.root", class_jets, {f"label_{other}": [other == name] * 10 for other in [*CLASSES, "w", "z"]})
        jets += class_jets
        labels += [index] * 10
    return jets, labels


def test_root_files_become_the_expected_sets(tmp_path, root_jets):
    counts, splits = run(tmp_path, "data=pythia", "data.generator.n_shards=1")
    expected = expected_sets(*root_jets, N_MAX)
    assert_matches(all_splits(splits), expected)
    assert counts["dropped_empty_jets"] == 3 and counts["dropped_nonfinite_jets"] == 3  # one of each per file
    assert splits["train"]["dropped_empty_jets"] == 3 and splits["test"]["dropped_nonfinite_jets"] == 3
    phi_rel = all_splits(splits)["particles"][..., 1]
    assert np.abs(phi_rel).max() < 1.5  # the jets straddling phi = pi too: unwrapped, they would give ~2 pi
    files = json.loads(splits["train"]["source_files"])
    assert [entry["file"] for entry in files] == ["g_000.root", "q_000.root", "t_000.root"]
    assert all(len(entry["sha256"]) == 64 for entry in files)


def test_jetnet_files_become_the_expected_sets(tmp_path):
    rng = np.random.default_rng(2)
    (tmp_path / "raw").mkdir()
    jets, labels = [], []
    for index, name in enumerate(["g", "t"]):
        class_jets = [jet for i, jet in enumerate(random_jets(rng, 9)) if i not in (EMPTY_JET, NAN_JET)]
        write_jetnet(tmp_path / "raw" / f"{name}.hdf5", class_jets, n_slots=30, rng=rng)
        jets += class_jets
        labels += [index] * len(class_jets)
    _, splits = run(tmp_path, "data=jetnet30", "data.class_names=[g,t]")
    assert_matches(all_splits(splits), expected_sets(jets, labels, N_MAX))


def test_top_tagging_files_become_the_expected_sets(tmp_path):
    rng = np.random.default_rng(3)
    (tmp_path / "raw").mkdir()
    jets = random_jets(rng, 12)
    is_signal = [int(value) for value in rng.integers(0, 2, len(jets))]
    for name in ("train.h5", "val.h5", "test.h5"):
        write_toptagging(tmp_path / "raw" / name, jets, is_signal, n_slots=20)
    _, splits = run(tmp_path, "data=toptagging")
    expected = expected_sets(jets * 3, is_signal * 3, N_MAX)
    assert_matches(all_splits(splits), expected)
    assert splits["train"]["class_names"] == ["qcd", "t"]


def test_quark_gluon_files_become_the_expected_sets(tmp_path):
    rng = np.random.default_rng(4)
    (tmp_path / "raw").mkdir()
    jets = [jet for i, jet in enumerate(random_jets(rng, 12)) if i != NAN_JET]
    pids = rng.choice([22, 211, -211, 321, 2212, 11, 130], size=(len(jets), 16))
    # The file holds (pt, y, phi, pid): the four-momenta the stage sees are the pids' masses'.
    seen = []
    for particles, jet_pids in zip(jets, pids):
        energy, px, py, pz = particles.astype(np.float64).T
        rapidity = 0.5 * np.log((energy + pz) / (energy - pz))
        momenta = four_momentum_from_pt_y_phi(np.hypot(px, py), rapidity, np.arctan2(py, px), pids2ms(jet_pids[: len(energy)]))
        seen.append(np.stack(momenta, axis=1))
    y = [int(value) for value in rng.integers(0, 2, len(jets))]
    names = list(compose_config("data=qg").data.files)  # the 20 files of the dataset: the same jets in each
    for name in names:
        write_quark_gluon(tmp_path / "raw" / name, jets, y, pids, n_slots=16)
    _, splits = run(tmp_path, "data=qg")
    assert_matches(all_splits(splits), expected_sets(seen * len(names), y * len(names), N_MAX))


def test_splits_are_exact_seeded_sorted_and_padded(tmp_path, root_jets):
    fractions = "data.split_fractions=[0.7,0.15,0.15]"
    counts, splits = run(tmp_path, "data=pythia", "data.generator.n_shards=1", fractions)
    n = sum(len(splits[split]["labels"]) for split in SPLITS)
    assert n == 24  # 30 jets, 6 dropped
    # Cumulative targets round(0.7 * 24) = 17 and round(0.85 * 24) = 20 of 24 jets.
    assert [len(splits[split]["labels"]) for split in SPLITS] == [17, 3, 4]
    for sets in splits.values():
        mask, pt_rel = sets["mask"], sets["particles"][..., 2]
        assert (np.diff(mask.astype(int), axis=1) <= 0).all()  # valid particles first
        assert (sets["particles"][~mask] == 0).all()  # padding is zero
        assert (np.diff(pt_rel, axis=1)[mask[:, 1:]] <= 0).all()  # hardest first
        np.testing.assert_array_equal(sets["jets"][:, 3], mask.sum(axis=1))  # n_particles
    again = run(tmp_path, "data=pythia", "data.generator.n_shards=1", fractions)[1]
    for split in SPLITS:
        np.testing.assert_array_equal(again[split]["particles"], splits[split]["particles"])
    reseeded = run(tmp_path, "data=pythia", "data.generator.n_shards=1", fractions, "seed=7")[1]
    assert not np.array_equal(reseeded["train"]["jets"], splits["train"]["jets"])


def test_split_counts_are_exact_over_any_chunking():
    fractions = [0.7, 0.15, 0.15]
    for chunk in (1, 3, 7, 1000):
        totals, seen = np.zeros(3, int), 0
        for size in [chunk] * (1001 // chunk) + [1001 % chunk]:
            totals += split_counts(seen, size, fractions)
            seen += size
        assert totals.tolist() == [701, 150, 150]


def test_normalisation_comes_from_the_train_split_only(tmp_path, root_jets):
    _, splits = run(tmp_path, "data=pythia", "data.generator.n_shards=1")
    normalisation = json.loads((tmp_path / "processed" / "normalisation.json").read_text())
    train = splits["train"]
    valid = train["particles"][train["mask"]].astype(np.float64)
    for feature, name in enumerate(["eta_rel", "phi_rel", "pt_rel"]):
        assert normalisation["particles"][name]["mean"] == pytest.approx(valid[:, feature].mean(), rel=1e-5)
        assert normalisation["particles"][name]["std"] == pytest.approx(valid[:, feature].std(), rel=1e-4)
    assert normalisation["jets"]["mass"]["mean"] == pytest.approx(train["jets"][:, 2].mean(), rel=1e-5)
    everything = np.concatenate([splits[split]["particles"][splits[split]["mask"]] for split in SPLITS])
    assert normalisation["particles"]["pt_rel"]["mean"] != pytest.approx(everything[:, 2].mean(), rel=1e-6)


def test_shards_preprocessed_apart_join_into_splits_that_read_as_one_file(tmp_path):
    """With data.preprocess_shards=2 each group of raw files (the k-th of every class) becomes its own
    shard of every split, by a job of its own; the joined split holds the shards' rows in order,
    the statistics are the joined train split's, and a missing or damaged shard is named."""
    rng = np.random.default_rng(3)
    (tmp_path / "raw").mkdir()
    jets, labels = [], []
    for index, name in enumerate(CLASSES):
        for shard in range(2):
            class_jets = random_jets(rng, 12)
            write_root(tmp_path / "raw" / f"{name}_{shard:03d}.root", class_jets,
                       {f"label_{other}": [other == name] * 12 for other in [*CLASSES, "w", "z"]})
            jets, labels = jets + class_jets, labels + [index] * 12
    sharded = ["data=pythia", "data.generator.n_shards=2", "data.preprocess_shards=2"]

    def config(folder, *overrides):
        return compose_config(f"data.raw_dir={tmp_path / 'raw'}", f"data.processed_dir={folder}", f"data.n_max={N_MAX}",
                              "data.chunk_jets=7", *sharded, *overrides)

    for shard in range(2):  # as Snakemake runs them: one job per shard, then one that joins them
        preprocess(config(tmp_path / "processed", f"data.preprocess_shard={shard}"), tmp_path / "processed", progress=False)
    assert not (tmp_path / "processed" / "train.h5").exists()
    counts, splits = run(tmp_path, *sharded, "data.preprocess_join=true")
    shards = tmp_path / "processed" / "shards"
    assert counts["jets_read"] == 72 and counts["dropped_empty_jets"] == 6
    assert_matches(all_splits(splits), expected_sets(jets, labels, N_MAX))  # every jet once, in one split
    for split in SPLITS:
        parts = [read_sets(shards / f"{split}-0000{shard}-of-00002.h5") for shard in range(2)]
        for name in ("particles", "mask", "jets", "labels"):
            np.testing.assert_array_equal(splits[split][name], np.concatenate([part[name] for part in parts]))
        assert [entry["file"] for entry in json.loads(parts[1]["source_files"])] == ["g_001.root", "q_001.root", "t_001.root"]
        with h5py.File(tmp_path / "processed" / f"{split}.h5") as file:
            assert all(file[name].is_virtual for name in ("particles", "mask", "jets", "labels"))
    train = splits["train"]
    normalisation = json.loads((tmp_path / "processed" / "normalisation.json").read_text())
    valid = train["particles"][train["mask"]].astype(np.float64)
    for feature, name in enumerate(["eta_rel", "phi_rel", "pt_rel"]):
        assert normalisation["particles"][name]["mean"] == pytest.approx(valid[:, feature].mean(), rel=1e-5)
        assert normalisation["particles"][name]["std"] == pytest.approx(valid[:, feature].std(), rel=1e-4)
    assert normalisation["n_train_jets"] == len(train["labels"])

    # All in one process (no Snakemake): the same files.
    preprocess(config(tmp_path / "at_once"), tmp_path / "at_once", progress=False)
    for split in SPLITS:
        np.testing.assert_array_equal(read_sets(tmp_path / "at_once" / f"{split}.h5")["particles"], splits[split]["particles"])

    # A damaged shard is named, and so is a missing one (HDF5 itself would read its rows as zeros).
    damaged_shard = shards / "train-00001-of-00002.h5"
    with h5py.File(damaged_shard) as file:
        offset = file["particles"].id.get_chunk_info(0).byte_offset
    with open(damaged_shard, "r+b") as file:
        file.seek(offset + 8)
        flipped = bytes(byte ^ 0xFF for byte in file.read(16))
        file.seek(offset + 8)
        file.write(flipped)
    with pytest.raises(PipelineError, match=f"^{damaged_shard} is damaged: a chunk of its 'particles' data"):
        read_sets(tmp_path / "processed" / "train.h5")
    damaged_shard.unlink()
    with pytest.raises(PipelineError, match=f"its shard {damaged_shard} does not exist"):
        read_sets(tmp_path / "processed" / "train.h5", datasets=("labels",))
    with pytest.raises(PipelineError, match="preprocess shard 1 first"):
        run(tmp_path, *sharded, "data.preprocess_join=true")


def test_other_classes_are_dropped_and_counted(tmp_path, root_jets):
    counts, splits = run(tmp_path, "data=pythia", "data.generator.n_shards=1", "data.class_names=[q,t]", chunk_jets=100)
    # raw_files lists only q and t files; feed the g file under q's name to see label filtering.
    assert counts["dropped_unlabelled_jets"] == 0
    (tmp_path / "raw" / "q_000.root").write_bytes((tmp_path / "raw" / "g_000.root").read_bytes())
    counts, splits = run(tmp_path, "data=pythia", "data.generator.n_shards=1", "data.class_names=[q,t]", chunk_jets=100)
    assert counts["dropped_unlabelled_jets"] == 8  # the g jets that were neither empty nor NaN
    assert set(np.concatenate([splits[split]["labels"] for split in SPLITS]).tolist()) == {1}  # only t (index 1)


def test_missing_branch_names_file_and_branch_and_writes_nothing(tmp_path, root_jets):
    write_root(tmp_path / "raw" / "q_000.root", random_jets(np.random.default_rng(0), 4), {"label_g": [False] * 4})
    result = run_stage("preprocess", f"data.raw_dir={tmp_path / 'raw'}", f"data.processed_dir={tmp_path / 'out'}",
                       "data.generator.n_shards=1")
    assert result.returncode == 2
    message = result.stderr.strip().splitlines()[-1]
    assert "q_000.root" in message and "'label_q'" in message and "Traceback" not in result.stderr
    assert not list((tmp_path / "out").glob("*.h5")) and not list((tmp_path / "out").glob(".*partial"))


@pytest.mark.parametrize("dataset, name", [("pythia", "g_000.root"), ("jetnet30", "g.hdf5"), ("qg", "QG_jets.npz")])
def test_a_file_that_is_not_the_format_is_refused_with_its_name(tmp_path, dataset, name):
    (tmp_path / "raw").mkdir()
    names = ["g_000.root", "q_000.root", "t_000.root", "g.hdf5", "q.hdf5", "t.hdf5", "w.hdf5", "z.hdf5", *compose_config("data=qg").data.files]
    for other in names:
        (tmp_path / "raw" / other).write_text("this is not a data file\n")
    with pytest.raises(PipelineError) as raised:
        run(tmp_path, f"data={dataset}", "data.generator.n_shards=1")
    assert name in str(raised.value) and "not a readable" in str(raised.value)
    assert not list((tmp_path / "processed").glob("*.h5"))


def test_missing_raw_file_says_how_to_make_it(tmp_path):
    result = run_stage("preprocess", f"data.raw_dir={tmp_path / 'raw'}", f"data.processed_dir={tmp_path / 'out'}")
    assert result.returncode == 2
    assert "python -m pipeline.generate" in result.stderr and "g_000.root" in result.stderr


def write_jetnet_arrays(raw, particle_features, jet_features):
    """Every class file of data=jetnet30 with these arrays."""
    raw.mkdir()
    for name in compose_config("data=jetnet30").data.class_names:
        with h5py.File(raw / f"{name}.hdf5", "w") as file:
            file["particle_features"], file["jet_features"] = particle_features, jet_features


@pytest.mark.parametrize("particle_shape, jet_shape, message", [
    ((6, 4), (6, 4), "'particle_features' has shape [6, 4], JetNet's is [jets, particles, 4]"),
    ((6, 5, 4), (4,), "'jet_features' has shape [4], JetNet's is [jets, 4]"),
    ((6, 5, 4), (5, 4), "'particle_features' holds 6 jets and 'jet_features' 5"),
])
def test_a_jetnet_file_of_the_wrong_shape_is_refused_with_one_sentence(tmp_path, particle_shape, jet_shape, message):
    """Shapes that numpy would broadcast or slice silently (a 1-D jet_features of 4 jets, fewer jet
    rows than particle rows) are refused, naming the file and the dataset."""
    write_jetnet_arrays(tmp_path / "raw", np.ones(particle_shape, np.float32), np.ones(jet_shape, np.float32))
    with pytest.raises(PipelineError) as raised:
        run(tmp_path, "data=jetnet30")
    assert str(raised.value).startswith(f"{tmp_path / 'raw' / 'g.hdf5'}: {message}")
    assert not list((tmp_path / "processed").glob("*.h5"))


def test_a_truncated_root_file_is_refused_with_one_sentence(tmp_path, root_jets):
    """A ROOT file cut short keeps its header (it opens, lists its branches) but not its baskets."""
    path = tmp_path / "raw" / "t_000.root"
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    result = run_stage("preprocess", f"data.raw_dir={tmp_path / 'raw'}", f"data.processed_dir={tmp_path / 'out'}",
                       "data.generator.n_shards=1")
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
    message = result.stderr.strip().splitlines()[-1]  # after MLflow's lines on creating a fresh store
    assert message.startswith(f"preprocess: error: {path} is truncated or damaged") and "generate it again" in message
    assert not list((tmp_path / "out").glob("*.h5"))
