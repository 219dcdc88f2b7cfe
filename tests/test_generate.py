"""Pythia 8 + FastJet generation: physically right jets, written as JetClass-style ROOT, reproducibly.

A few dozen jets per class (seconds): thresholds are loose enough to be stable and tight enough to
catch a wrong sign, unit or frame.
"""

import awkward as ak
import mlflow
import numpy as np
import pytest
import uproot

from conftest import compose_config, run_stage
from pipeline.generate import generate_shard, pythia_settings, start_pythia, write_root
from pipeline.jets import azimuth, delta_r, jet_kinematics, rapidity

N_JETS = 50
NEUTRINOS = {12, 14, 16}
# The pT-hat floor decides which events feed the jet-pT window, not what makes a top jet a top jet;
# these tests use the old floor (0.9 x jet_pt_min), which misses jets of the window but needs 7-10x
# fewer events per jet than the default (benchmarks/README.md).
FAST_FLOOR = "data.generator.pt_hat_min_fraction=0.9"


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    """One shard of N_JETS jets per class, written to ROOT and read back as awkward arrays."""
    generator = compose_config(f"data.generator.jets_per_shard={N_JETS}", "data.generator.batch_events=50", FAST_FLOOR).data.generator
    folder = tmp_path_factory.mktemp("raw")
    trees = {}
    for name in ("g", "q", "t", "w"):
        result = generate_shard(name, 0, 0, generator, progress=False)
        write_root(folder / f"{name}.root", result["jets"], name)
        trees[name] = uproot.open(folder / f"{name}.root")["tree"].arrays()
    return trees, generator


def test_top_and_w_jets_have_their_masses(shards):
    trees, _ = shards
    top_mass, w_mass = np.median(trees["t"].jet_mass), np.median(trees["w"].jet_mass)
    assert 140 < top_mass < 200
    # Ungroomed R = 0.8 jets at 1 TeV carry underlying-event mass too: the W peak sits a little
    # above 80 GeV, far below the top and far above light-quark jets' typical mass.
    assert 70 < w_mass < 110
    assert np.mean((trees["w"].jet_mass > 60) & (trees["w"].jet_mass < 120)) > 0.6


def test_gluon_jets_have_more_constituents_than_quark_jets(shards):
    trees, _ = shards
    assert np.mean(trees["g"].jet_nparticles) > 1.2 * np.mean(trees["q"].jet_nparticles)


def test_jets_lie_in_the_window_and_are_the_sum_of_their_visible_constituents(shards):
    trees, generator = shards
    for name, tree in trees.items():
        assert len(tree) == N_JETS
        assert ak.all(tree[f"label_{name}"]) and not any(ak.any(tree[f"label_{other}"]) for other in trees if other != name)
        assert ak.all((tree.jet_pt >= generator.jet_pt_min) & (tree.jet_pt <= generator.jet_pt_max))
        assert ak.all(abs(tree.jet_eta) < generator.jet_eta_max)
        summed = jet_kinematics(*(ak.to_numpy(ak.sum(tree[f"part_{c}"], axis=1)).astype(np.float64) for c in ("energy", "px", "py", "pz")))
        np.testing.assert_allclose(summed["pt"], tree.jet_pt, rtol=1e-4)
        np.testing.assert_allclose(summed["mass"], tree.jet_mass, rtol=1e-3, atol=0.05)
        np.testing.assert_array_equal(ak.num(tree.part_px), tree.jet_nparticles)
        assert not set(np.abs(ak.to_numpy(ak.flatten(tree.part_pid))).tolist()) & NEUTRINOS
        # Anti-kT jets are cones of radius R in (rapidity, phi) around the jet axis.
        jet_rapidity = rapidity(tree.jet_energy, summed["pt"] * np.sinh(tree.jet_eta))
        particle_rapidity = rapidity(tree.part_energy, tree.part_pz)
        distance = delta_r(particle_rapidity, azimuth(tree.part_px, tree.part_py), jet_rapidity, tree.jet_phi)
        assert ak.mean(distance < generator.jet_radius + 1e-3) > 0.995
        pt = np.hypot(tree.part_px, tree.part_py)
        assert ak.all(pt[:, 1:] <= pt[:, :-1])  # hardest first, as JetClass


def test_a_shard_is_reproducible_and_shards_differ(tmp_path):
    overrides = ["data.generator.class_name=t", "data.generator.jets_per_shard=5", "data.generator.batch_events=20", FAST_FLOOR]
    for folder, shard in (("first", 0), ("again", 0), ("other", 1)):
        result = run_stage("generate", f"data.raw_dir={tmp_path / folder}", f"data.generator.shard={shard}", *overrides)
        assert result.returncode == 0, result.stderr
        assert "events/s" in result.stdout
    read = {folder: uproot.open(next((tmp_path / folder).glob("t_*.root")))["tree"].arrays() for folder in ("first", "again", "other")}
    assert (tmp_path / "first" / "t_000.root").exists() and (tmp_path / "other" / "t_001.root").exists()
    assert ak.all(read["first"].part_px == read["again"].part_px)
    assert not np.array_equal(read["first"].jet_pt, read["other"].jet_pt)
    assert uproot.open(tmp_path / "first" / "t_000.root")["tree"].classname == "TTree"
    runs = mlflow.search_runs(experiment_names=["demo"], order_by=["attributes.start_time"])
    assert runs["tags.mlflow.runName"].tolist() == ["generate t/0", "generate t/0", "generate t/1"]


def test_an_unknown_class_is_refused(tmp_path):
    result = run_stage("generate", f"data.raw_dir={tmp_path}", "data.class_names=[g,h]", "data.generator.jets_per_shard=1")
    assert result.returncode == 2
    assert "'h'" in result.stderr and "Traceback" not in result.stderr
    assert not list(tmp_path.glob("*.root"))


@pytest.mark.parametrize("overrides", [[], ["data.generator.pt_hat_min_fraction=0.75"]], ids=["default", "configured"])
def test_pythia_draws_the_hard_process_down_to_the_configured_floor(overrides):
    """The generator's Pythia samples pT-hat from data.generator.pt_hat_min_fraction x jet_pt_min up:
    never below it, and mostly just above it (the spectrum falls steeply)."""
    generator = compose_config(*overrides).data.generator
    floor = generator.pt_hat_min_fraction * generator.jet_pt_min
    pythia = start_pythia(pythia_settings("g", generator, seed=1))
    pt_hat = np.sqrt(ak.to_numpy(pythia.nextBatch(40).info.pT2Hat))
    assert pt_hat.min() >= floor
    assert np.mean(pt_hat < 1.1 * floor) > 0.2
