"""Generate stage: real jets without internet, from Pythia 8 + FastJet, as JetClass-style ROOT files.

``python -m pipeline.generate [data=pythia] [data.generator.class_name=t data.generator.shard=0]``

For each class of ``data.class_names`` and each shard, Pythia 8 (Bierlich et al. 2022,
arXiv:2203.11601) makes pp collisions at ``data.generator.sqrt_s`` with multi-parton interactions,
showers and hadronisation on; the visible final state (every stable particle but neutrinos) is
clustered with anti-kT (Cacciari, Salam, Soyez 2008, arXiv:0802.1189) of radius
``data.generator.jet_radius`` by FastJet, over whole batches of events at once (no Python loop per
particle or per jet). A jet is kept when it lies in the configured pT window and |eta| range and is
matched to the class's hard-process object within the jet radius, as JetNet's jets are (Kansal et
al. 2021, arXiv:2106.11535):

====  ====================================================  =========================================
class process                                               truth match
====  ====================================================  =========================================
g     gg -> gg, q qbar -> gg                                an outgoing gluon
q     qq -> qq, q qbar -> q' qbar' (u, d, s)                an outgoing light quark
t     gg, q qbar -> t tbar, W -> hadrons                    the top and >= 3 of its decay quarks
w     q qbar -> W g, q g -> W q, W -> hadrons               the W and both of its decay quarks
z     q qbar -> Z g, q g -> Z q, Z -> hadrons               the Z and both of its decay quarks
====  ====================================================  =========================================

Each shard is seeded from ``seed``, the class and the shard number, so a shard is reproducible and
shards are independent; Snakemake runs one job per (class, shard). A shard writes
``<raw_dir>/<class>_<shard>.root`` (tree ``tree``): jagged ``part_px, part_py, part_pz,
part_energy`` (GeV) and ``part_pid`` (PDG id) per constituent, ``jet_pt, jet_eta, jet_phi,
jet_energy, jet_mass, jet_nparticles``, and one-hot ``label_<class>`` for every known class, the
layout of JetClass so that ``pipeline.preprocess`` reads generated and downloaded files alike.
"""

from __future__ import annotations

import functools
import operator
import time
from dataclasses import dataclass
from pathlib import Path

import awkward as ak
import fastjet
import hydra
import mlflow
import numpy as np
import pythia8mc
import uproot
from omegaconf import DictConfig
from tqdm import tqdm

from .config import Config, pythia_shard_stem
from .jets import azimuth, delta_r, invariant_mass, pseudorapidity, transverse_momentum
from .files import PipelineError, atomic_output
from .stage import stage
from .tracking import WRITTEN, FileDataset, log_files

NEUTRINOS = (12, 14, 16)
JETS_PER_BASKET = 10_000  # jets per ROOT basket
PYTHIA_MAX_SEED = 900_000_000  # Pythia accepts Random:seed in [1, 900 000 000]
HADRONIC_W = ["24:onMode = off", "24:onIfAny = 1 2 3 4 5"]
HADRONIC_Z = ["23:onMode = off", "23:onIfAny = 1 2 3 4 5"]


@dataclass(frozen=True)
class JetClass:
    """How one class of jets is made (Pythia processes) and recognised (truth match)."""

    processes: tuple[str, ...]
    parton_ids: tuple[int, ...]  # |PDG id| of the outgoing hard partons that may start the jet
    resonance_id: int | None = None  # |PDG id| of the decaying resonance the jet must contain
    decay_quarks: int = 0  # outgoing quarks of the resonance decay the jet must contain


CLASSES: dict[str, JetClass] = {
    "g": JetClass(("HardQCD:gg2gg = on", "HardQCD:qqbar2gg = on"), parton_ids=(21,)),
    "q": JetClass(("HardQCD:qq2qq = on", "HardQCD:qqbar2qqbarNew = on"), parton_ids=(1, 2, 3)),
    "t": JetClass(
        ("Top:gg2ttbar = on", "Top:qqbar2ttbar = on", *HADRONIC_W),
        parton_ids=(1, 2, 3, 4, 5), resonance_id=6, decay_quarks=3,
    ),
    "w": JetClass(
        ("WeakBosonAndParton:qqbar2Wg = on", "WeakBosonAndParton:qg2Wq = on", *HADRONIC_W),
        parton_ids=(1, 2, 3, 4, 5), resonance_id=24, decay_quarks=2,
    ),
    "z": JetClass(
        ("WeakBosonAndParton:qqbar2gmZg = on", "WeakBosonAndParton:qg2gmZq = on",
         "WeakZ0:gmZmode = 2", *HADRONIC_Z),
        parton_ids=(1, 2, 3, 4, 5), resonance_id=23, decay_quarks=2,
    ),
}
HARD_OUTGOING = 23  # |status| of the outgoing particles of the hardest process (and resonance decays)
HARD_INTERMEDIATE = 22  # |status| of its intermediate resonances (t, W, Z)


def one_of(pid: ak.Array, ids) -> ak.Array:
    """Elementwise ``pid in ids`` for jagged arrays (``np.isin`` needs rectangular ones)."""
    return functools.reduce(operator.or_, (pid == value for value in ids))


def shard_seed(seed: int, class_name: str, shard: int) -> int:
    """Pythia's seed for one shard: independent streams per (seed, class, shard)."""
    class_index = list(CLASSES).index(class_name)
    state = np.random.SeedSequence([seed, class_index, shard]).generate_state(1, dtype=np.uint64)[0]
    return int(state % PYTHIA_MAX_SEED) + 1


def pythia_settings(class_name: str, generator: DictConfig, seed: int) -> list[str]:
    """Every Pythia setting of one shard; the pT-hat range brackets the jet pT window.

    A jet usually carries a little less pT than its parton (radiation out of the cone), so the range
    reaches 20% above the window. Recoil against initial-state radiation lifts many jets above their
    parton's pT-hat, though, and the pT-hat spectrum falls steeply, so the floor,
    ``generator.pt_hat_min_fraction`` x ``jet_pt_min``, sits far below the window: at 0.9 it would
    miss 31% of the window's gluon jets (38% at its low edge, 21% at its top); at 0.6, ~1% of
    gluon and quark jets and 5% of top jets (``benchmarks/bench_pt_hat_floor.py``).
    """
    return [
        f"Beams:eCM = {generator.sqrt_s}",
        *CLASSES[class_name].processes,
        f"PhaseSpace:pTHatMin = {generator.pt_hat_min_fraction * generator.jet_pt_min}",
        f"PhaseSpace:pTHatMax = {1.2 * generator.jet_pt_max}",
        "Random:setSeed = on",
        f"Random:seed = {seed}",
        "Print:quiet = on",
        *generator.pythia_settings,
    ]


def start_pythia(settings: list[str]) -> pythia8mc.Pythia:
    pythia = pythia8mc.Pythia("", False)
    for line in settings:
        if not pythia.readString(line):
            raise PipelineError(f"Pythia does not understand the setting {line!r}; fix data.generator.pythia_settings.")
    if not pythia.init():
        raise PipelineError("Pythia failed to initialise with these settings; check data.generator.")
    return pythia


def visible_final_state(particles: ak.Array) -> ak.Array:
    """Stable particles (status > 0) except neutrinos, as jagged ``px, py, pz, E, pid`` records."""
    visible = particles[(particles.status > 0) & ~one_of(np.abs(particles.id), NEUTRINOS)]
    return ak.zip(
        {"px": visible.p.px, "py": visible.p.py, "pz": visible.p.pz, "E": visible.p.e, "pid": visible.id},
        with_name=None,
    )


def cluster(visible: ak.Array, radius: float, pt_min: float) -> tuple[ak.Array, ak.Array]:
    """Anti-kT jets above ``pt_min`` of every event, and their constituents (with ``pid``).

    Returns ``jets[event, jet]`` (px, py, pz, E) and ``constituents[event, jet, particle]``.
    """
    four_momenta = ak.zip({name: visible[name] for name in ("px", "py", "pz", "E")})
    sequence = fastjet.ClusterSequence(four_momenta, fastjet.JetDefinition(fastjet.antikt_algorithm, radius))
    jets = sequence.inclusive_jets(pt_min)
    index = sequence.constituent_index(pt_min)  # [event, jet, particle] into visible[event]
    # Gather the constituent records through one flat index: offset each event's indices by
    # where that event starts among all visible particles.
    event_start = np.cumsum(np.concatenate([[0], ak.to_numpy(ak.num(visible))[:-1]]))
    flat_index = index + event_start[:, None, None] if len(index) else index
    flat = ak.flatten(visible)[ak.flatten(flat_index, axis=None)]
    per_jet = ak.unflatten(flat, ak.flatten(ak.num(index, axis=2)))
    constituents = ak.unflatten(per_jet, ak.num(index, axis=1))
    return jets, constituents


def truth_matched(particles: ak.Array, jet_eta, jet_phi, jet_class: JetClass, radius: float) -> ak.Array:
    """Which jets ``[event, jet]`` come from the class's hard-process object (within ``radius``)."""
    status, pid = np.abs(particles.status), np.abs(particles.id)

    def within_radius(selected: ak.Array) -> ak.Array:
        """Per jet, how many of the selected particles of its event lie within ``radius``."""
        eta = pseudorapidity(selected.p.px, selected.p.py, selected.p.pz)
        phi = azimuth(selected.p.px, selected.p.py)
        distance = delta_r(jet_eta[:, :, None], jet_phi[:, :, None], eta[:, None, :], phi[:, None, :])
        return ak.sum(distance < radius, axis=2)

    partons = particles[(status == HARD_OUTGOING) & one_of(pid, jet_class.parton_ids)]
    if jet_class.resonance_id is None:
        return within_radius(partons) >= 1
    resonances = particles[(status == HARD_INTERMEDIATE) & (pid == jet_class.resonance_id)]
    return (within_radius(resonances) >= 1) & (within_radius(partons) >= jet_class.decay_quarks)


def select_jets(particles: ak.Array, class_name: str, generator: DictConfig) -> ak.Array:
    """The accepted jets of each of a batch of Pythia events, ``[event, jet]``: one record per jet
    with its kinematics and its constituents, hardest first."""
    visible = visible_final_state(particles)
    jets, constituents = cluster(visible, generator.jet_radius, 0.5 * generator.jet_pt_min)
    jet_pt = transverse_momentum(jets.px, jets.py)
    jet_eta = pseudorapidity(jets.px, jets.py, jets.pz)
    jet_phi = azimuth(jets.px, jets.py)
    accepted = (
        (jet_pt >= generator.jet_pt_min)
        & (jet_pt <= generator.jet_pt_max)
        & (np.abs(jet_eta) < generator.jet_eta_max)
        & truth_matched(particles, jet_eta, jet_phi, CLASSES[class_name], generator.jet_radius)
    )
    mass = invariant_mass(jets.E, jets.px, jets.py, jets.pz)
    kept = constituents[accepted]
    kept = kept[ak.argsort(transverse_momentum(kept.px, kept.py), axis=2, ascending=False)]  # as JetClass
    return ak.zip(
        {
            "pt": jet_pt[accepted],
            "eta": jet_eta[accepted],
            "phi": jet_phi[accepted],
            "energy": jets.E[accepted],
            "mass": mass[accepted],
            "constituents": kept,
        },
        depth_limit=2,
    )


def generate_shard(class_name: str, shard: int, seed: int, generator: DictConfig, progress: bool = True) -> dict:
    """Run Pythia until ``generator.jets_per_shard`` jets of ``class_name`` are accepted.

    Returns the jets (exactly that many, in generation order) and counts: jets accepted (the last
    batch may give more than needed), events generated, seconds spent in Pythia and in total.
    """
    pythia = start_pythia(pythia_settings(class_name, generator, shard_seed(seed, class_name, shard)))
    batches, n_jets, n_events, pythia_seconds = [], 0, 0, 0.0
    start = time.perf_counter()
    with tqdm(total=generator.jets_per_shard, desc=f"{class_name} shard {shard}", unit="jet", disable=None if progress else True) as bar:
        while n_jets < generator.jets_per_shard:
            tick = time.perf_counter()
            events = pythia.nextBatch(generator.batch_events)
            pythia_seconds += time.perf_counter() - tick
            accepted = ak.flatten(select_jets(events.prt, class_name, generator), axis=1)
            batches.append(accepted)
            n_events += len(events)
            n_jets += len(accepted)
            bar.update(min(len(accepted), generator.jets_per_shard - bar.n))
            bar.set_postfix(events_per_s=f"{n_events / (time.perf_counter() - start):.0f}")
    jets = ak.concatenate(batches)[: generator.jets_per_shard]
    return {"jets": jets, "accepted": n_jets, "events": n_events, "pythia_seconds": pythia_seconds,
            "seconds": time.perf_counter() - start}


def write_root(path: Path, jets: ak.Array, class_name: str) -> None:
    """Write jets as a JetClass-style tree, atomically (a temporary file renamed into place)."""
    constituents = jets.constituents
    branches = {
        "part": ak.zip(
            {
                **{name: ak.values_astype(constituents[field], np.float32)
                   for name, field in (("px", "px"), ("py", "py"), ("pz", "pz"), ("energy", "E"))},
                "pid": constituents.pid,
            }
        ),
        "jet_pt": ak.to_numpy(jets.pt), "jet_eta": ak.to_numpy(jets.eta), "jet_phi": ak.to_numpy(jets.phi),
        "jet_energy": ak.to_numpy(jets.energy), "jet_mass": ak.to_numpy(jets.mass),
        "jet_nparticles": ak.to_numpy(ak.num(constituents)).astype(np.int32),
        **{f"label_{name}": np.full(len(jets), name == class_name) for name in CLASSES},
    }
    with atomic_output(path, mode="w+b") as file, uproot.recreate(file) as root_file:
        types = {name: array.type if isinstance(array, ak.Array) else array.dtype for name, array in branches.items()}
        root_file.mktree("tree", types)  # a TTree (part_* branches with counter npart), as JetClass
        for start in range(0, len(jets), JETS_PER_BASKET):  # baskets of bounded size, read in slices later
            root_file["tree"].extend({name: array[start : start + JETS_PER_BASKET] for name, array in branches.items()})


def shard_path(raw_dir, class_name: str, shard: int) -> Path:
    return Path(raw_dir) / f"{pythia_shard_stem(class_name, shard)}.root"


@hydra.main(config_path="conf", config_name="config", version_base="1.3")
def main(cfg: Config) -> None:
    generator = cfg.data.generator
    class_names = [generator.class_name] if generator.class_name is not None else list(cfg.data.class_names)
    shards = [generator.shard] if generator.shard is not None else list(range(generator.n_shards))
    one_shard = len(class_names) * len(shards) == 1
    config_file = f"{pythia_shard_stem(class_names[0], shards[0])}.config.yaml" if one_shard else "generate.config.yaml"
    label = f"{class_names[0]}/{shards[0]}" if one_shard else None
    with stage("generate", cfg, output_dir=cfg.data.raw_dir, config_file=config_file, label=label) as raw_dir:
        unknown = sorted(set(class_names) - set(CLASSES))
        if unknown:
            raise PipelineError(f"cannot generate class {unknown[0]!r}: Pythia jets exist for {', '.join(CLASSES)}; fix data.class_names.")
        for class_name in class_names:
            for shard in shards:
                result = generate_shard(class_name, shard, cfg.seed, generator)
                write_root(shard_path(raw_dir, class_name, shard), result["jets"], class_name)
                log_files(WRITTEN, [FileDataset(shard_path(raw_dir, class_name, shard), len(result["jets"]))])
                prefix = pythia_shard_stem(class_name, shard)
                mlflow.log_metrics({
                    f"{prefix}.events": result["events"],
                    f"{prefix}.events_per_s": result["events"] / result["seconds"],
                    f"{prefix}.pythia_fraction": result["pythia_seconds"] / result["seconds"],
                    f"{prefix}.jets_per_event": result["accepted"] / result["events"],
                })
                print(
                    f"generate: {shard_path(raw_dir, class_name, shard)}: {len(result['jets'])} jets from "
                    f"{result['events']} events, {result['events'] / result['seconds']:.0f} events/s "
                    f"({100 * result['pythia_seconds'] / result['seconds']:.0f}% of the time in Pythia)"
                )


if __name__ == "__main__":
    main()
