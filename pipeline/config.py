"""The configuration schema: structured-config dataclasses registered with Hydra.

Every stage composes ``pipeline/conf/config.yaml`` on top of ``Config``. Because the dataclasses are
the schema, an unknown key (``model.d_modle=64``) or a wrong type (``model.d_model=abc``) is refused
by Hydra while composing, before any work starts, with a message that names the key. Groups:
``data/``, ``model/``, ``train/``, ``sample/``, ``evaluate/`` and ``experiment/`` (presets that set
several groups at once, e.g. ``experiment=demo``).
"""

from __future__ import annotations

import re
import sys
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, OmegaConf

from setdiff.constants import GAMMA_MAX, GAMMA_MIN

# The particle features of the sets file, in order (see pipeline/sets.py, the sets file's layout).
PARTICLE_FEATURES = ["eta_rel", "phi_rel", "pt_rel"]
JET_FEATURES = ["pt", "eta", "mass", "n_particles"]

# Experiment, dataset and class names become folder and file names, MLflow experiments, Snakemake
# wildcards and arguments of shell commands: letters, digits, '_' and '-', starting with a letter or
# a digit (so no path separators, no '..', nothing a shell expands, no leading '-' read as an option).
# workflow/schemas/config.schema.yaml holds the same pattern for the workflow's experiment names.
SAFE_NAME = r"[A-Za-z0-9][A-Za-z0-9_-]*"


def unsafe_name(key: str, value) -> str | None:
    """The sentence refusing ``key=value`` if ``value`` is not a :data:`SAFE_NAME`, else None."""
    if re.fullmatch(SAFE_NAME, str(value)):
        return None
    return (f"{key}={str(value)!r} is not a safe name: it becomes folder and file names and shell arguments, so "
            "use letters, digits, '_' and '-' only, starting with a letter or a digit.")


def check_names(cfg) -> None:
    """Refuse (``ValueError``) a config whose experiment name (``name``), dataset name (``data.name``)
    or class names (``data.class_names``) are not :data:`SAFE_NAME`s, naming the first such key."""
    named = [("name", cfg.name), ("data.name", cfg.data.name)]
    named += [(f"data.class_names[{index}]", name) for index, name in enumerate(cfg.data.class_names)]
    for key, value in named:
        if (refusal := unsafe_name(key, value)) is not None:
            raise ValueError(refusal)


def _safe_name(key: str, value) -> str:
    """The resolver ``${safe_name:<key>,<value>}`` in the default folders (``results_dir``,
    ``data.raw_dir``, ``data.processed_dir``): Hydra resolves them to make its run folder before any
    stage code runs, so an unsafe name stops the process there, with one sentence and exit status 2,
    before any folder exists. (An exception would reach the user as a page of OmegaConf traceback.)
    The sentence starts with the stage's name, as every stage's refusals do (``python -m
    pipeline.generate`` runs ``pipeline/generate.py``)."""
    if (refusal := unsafe_name(key, value)) is not None:
        print(f"{Path(sys.argv[0]).stem}: error: {refusal}", file=sys.stderr)
        raise SystemExit(2)
    return value


if not OmegaConf.has_resolver("safe_name"):
    OmegaConf.register_new_resolver("safe_name", _safe_name)


class Schedule(Enum):
    """Noise schedules of ``setdiff.schedules.SCHEDULES``."""

    fixed_linear = "fixed_linear"
    learned_linear = "learned_linear"


class Parameterization(Enum):
    """What the score network predicts (``setdiff.vdm.PARAMETERIZATIONS``)."""

    eps = "eps"  # the noise
    v = "v"  # v = alpha eps - sigma x: EDM's preconditioning for unit-variance data


class Conditioning(Enum):
    """How the transformer blocks take time, size and class (``setdiff.networks.CONDITIONINGS``)."""

    additive = "additive"  # one vector added to every element before each block
    adaln = "adaln"  # DiT's adaLN-Zero: scale, shift and gate of each block's branches


class CondDrop(Enum):
    """What classifier-free dropout removes, and so what guidance sharpens (``setdiff.networks.COND_DROPS``)."""

    class_and_context = "class_and_context"
    context = "context"  # the jet features alone: the class is always seen (needs model.use_jet_context)


class LossWeighting(Enum):
    """How the diffusion term of the training loss weighs the noise levels (``setdiff.vdm.LOSS_WEIGHTINGS``)."""

    elbo = "elbo"  # the negative ELBO itself
    sigmoid = "sigmoid"  # sigmoid(b - log SNR), Kingma & Gao 2023
    elbo_plus_sigmoid = "elbo_plus_sigmoid"  # 1 + sigmoid(b - log SNR): the ELBO, noisy times weighing up to twice
    edm = "edm"  # EDM's loss (Karras et al. 2022) as a weighting of the ELBO, Kingma & Gao 2023


class Sampler(Enum):
    """Samplers of ``setdiff.sampling.SAMPLERS``."""

    ancestral = "ancestral"
    ddim = "ddim"
    heun = "heun"


class MaskSource(Enum):
    """Where generated jets take their multiplicities from."""

    train = "train"  # drawn from the train split's multiplicity distribution, per class
    test = "test"  # the test split's masks, one for one


class CheckpointChoice(Enum):
    """Which checkpoint of a training run the later stages use (both hold the EMA parameters)."""

    best = "best"  # lowest val NELBO
    latest = "latest"


class Source(Enum):
    """Where a dataset's raw files come from, and so which reader ``pipeline.preprocess`` uses."""

    pythia = "pythia"  # generated here with Pythia 8 + FastJet (``pipeline.generate``): ROOT
    jetnet = "jetnet"  # JetNet HDF5, one file per class (Kansal et al. 2021)
    jetclass = "jetclass"  # JetClass ROOT files (Qu, Li, Qian 2022)
    toptagging = "toptagging"  # top-tagging reference dataset, pandas HDF5 (Kasieczka et al. 2019)
    qg = "qg"  # energyflow's quark/gluon jets, npz (Komiske, Metodiev, Thaler 2019)


# File names, used by the stages and the workflow's rules alike.
def pythia_shard_stem(class_name: str, shard: int) -> str:
    """The name of shard ``shard`` of class ``class_name`` from ``pipeline.generate``, without its
    suffix: ``g_000`` (the jets ``g_000.root``, its config ``g_000.config.yaml``)."""
    return f"{class_name}_{shard:03d}"


SHARDS_FOLDER = "shards"  # under data.processed_dir, with data.preprocess_shards > 1


def processed_shard_stem(shard: int, n_shards: int) -> str:
    """The name of preprocessing shard ``shard`` of ``n_shards``: ``00003-of-00010``; its splits are
    ``train-00003-of-00010.h5`` and so on, its statistics ``moments-00003-of-00010.json``."""
    return f"{shard:05d}-of-{n_shards:05d}"


def jetnet_file_name(labels, class_name: str) -> str:
    """The JetNet file of ``class_name``: as ``data.labels`` names it, else JetNet's own ``<class>.hdf5``."""
    return labels.get(class_name, f"{class_name}.hdf5")


@dataclass
class RemoteFile:
    """One file of a public dataset: where it lives under ``data.base_url`` and its checksum."""

    path: str = MISSING  # URL path under data.base_url, e.g. records/6975118/files/g.hdf5
    known_hash: str | None = None  # "md5:<hex>" or "sha256:<hex>"; None: the one its Zenodo record publishes
    members: list[str] = field(default_factory=list)  # for a tar archive: the members to extract


@dataclass
class GeneratorConfig:
    """Pythia 8 + FastJet jet generation (``pipeline.generate``); JetNet-like defaults."""

    jets_per_shard: int = 1_000  # jets of one class written by one shard
    n_shards: int = 2  # shards per class; Snakemake runs them in parallel
    sqrt_s: float = 13_000.0  # GeV, pp collisions
    jet_radius: float = 0.8  # anti-kT R
    jet_eta_max: float = 2.5
    jet_pt_min: float = 900.0  # GeV: the jet pT window (JetNet: jets near 1 TeV)
    jet_pt_max: float = 1_100.0
    # Pythia's PhaseSpace:pTHatMin = this x jet_pt_min. Recoil against initial-state radiation lifts
    # many jets above their parton's pT-hat: 0.9 misses 31% of the window's gluon jets, 0.6 ~1% (g, q)
    # and 5% (t), for 7-10x the events per jet (benchmarks/README.md, bench_pt_hat_floor.py)
    pt_hat_min_fraction: float = 0.6
    batch_events: int = 100  # events generated and clustered at once
    pythia_settings: list[str] = field(default_factory=list)  # extra Pythia readString lines
    class_name: str | None = None  # generate only this class (Snakemake: one job per shard)
    shard: int | None = None  # generate only this shard


@dataclass
class DataConfig:
    """A jet dataset: where its raw and processed files live and what its sets look like."""

    name: str = MISSING
    source: Source = Source.pythia
    n_max: int = 30  # particles kept per jet (highest pt_rel first)
    class_names: list[str] = field(default_factory=lambda: ["g", "q", "t"])
    # class name -> how the source marks it: a label branch (ROOT), a file name (JetNet), or the
    # value of the label column (top tagging: is_signal_new; qg: y). Empty: the class name itself.
    labels: dict[str, str] = field(default_factory=dict)
    feature_names: list[str] = field(default_factory=lambda: list(PARTICLE_FEATURES))
    jet_feature_names: list[str] = field(default_factory=lambda: list(JET_FEATURES))
    raw_dir: str = "data/raw/${safe_name:data.name,${.name}}"
    processed_dir: str = "data/processed/${safe_name:data.name,${.name}}"
    # Downloads (``pipeline.download``): file name under raw_dir -> where it lives, its checksum.
    base_url: str = "https://zenodo.org"  # a mirror replaces the host, the paths stay
    verify: bool = True  # check every file against its known_hash, or its Zenodo record's checksum
    files: dict[str, RemoteFile] = field(default_factory=dict)
    generator: GeneratorConfig = field(default_factory=GeneratorConfig)
    # Preprocessing (``pipeline.preprocess``): seeded train/val/test split of all jets.
    split_fractions: list[float] = field(default_factory=lambda: [0.7, 0.15, 0.15])
    chunk_jets: int = 50_000  # jets read and converted at once (bounds memory: a few chunks are in flight)
    # More than 1: the raw files are dealt round-robin into this many groups, each preprocessed into
    # shards of every split (Snakemake: one job per shard), then joined (pipeline.preprocess).
    preprocess_shards: int = 1
    preprocess_shard: int | None = None  # preprocess only this shard
    preprocess_join: bool = False  # only join the shards already written, and merge their statistics


@dataclass
class ModelConfig:
    """The transformer-guided VDM (``setdiff.VDM`` with a ``setdiff.ScoreNet``)."""

    d_model: int = 128
    n_layers: int = 4
    n_heads: int = 4
    mlp_ratio: int = 4
    n_inducing: int = 0  # 0: full masked self-attention; >0: ISAB with this many inducing points
    pair_bias_width: int = 0  # >0: a learned attention bias for every pair of particles, from an MLP this wide
    schedule: Schedule = Schedule.learned_linear
    gamma_min: float = GAMMA_MIN
    gamma_max: float = GAMMA_MAX
    timesteps: int = 0  # 0: continuous-time bound; T > 0: discrete-time bound with T steps
    cond_drop_prob: float = 0.1  # classifier-free guidance dropout of the class / context
    # What that dropout (and so guidance) removes; guidance of either kind made the full-size fidelity
    # benchmark's jets worse (benchmarks/README.md)
    cond_drop: CondDrop = CondDrop.class_and_context
    latent_dim: int = 0  # 0: diffuse the features; >0: latent diffusion with this width
    conditioning: Conditioning = Conditioning.adaln  # fidelity benchmark: better W1P, FPD, KPD, COV (benchmarks/README.md)
    parameterization: Parameterization = Parameterization.v  # fidelity benchmark: no outliers (benchmarks/README.md)
    # The ELBO is logged and validated either way; the weighted ones need schedule=fixed_linear (benchmarks/README.md)
    loss_weighting: LossWeighting = LossWeighting.elbo
    sigmoid_bias: float = 0.0  # b of the sigmoid weightings
    # Model log(pt_rel) instead of pt_rel (both standardised): every generated pt_rel is positive, where
    # pt_rel itself has its tails cut at 0; fidelity benchmark, two seeds: top W1M and gluon FPD and W1EFP
    # lower, top FPD higher (benchmarks/README.md)
    log_pt_rel: bool = True
    use_jet_context: bool = False  # also condition on (pt, eta, mass, n_particles)
    # True: the jet features enter the conditioning MLP's hidden layer beside time and size (nonlinear
    # in them; better at full size, worse for the demo's 6 000 steps, see benchmarks/README.md);
    # False: one linear map of them is added to the conditioning vector
    context_mlp: bool = False
    # True: the class enters the conditioning MLP's hidden layer too, so that the conditioning's dependence
    # on time, size and jet features can differ by class; False: its embedding is added after the MLP
    class_mlp: bool = False
    # True: also give the network each jet's sum of pt_rel over its kept particles (how much of the jet's
    # pT the particles past n_max took away), taken from the template jet when sampling; needs
    # model.use_jet_context and the normalisation.json of a recent preprocess
    context_pt_rel_sum: bool = False
    # True: the jet mass among the jet features is the mass of the kept particles (the n_max hardest,
    # those the model generates) instead of the whole jet's, so that the feature says what the generated
    # particles should add up to; needs model.use_jet_context (in the demo: top jets' W1M 1.7x higher,
    # the mass fixed exactly is missed as widely, see benchmarks/README.md)
    context_kept_mass: bool = False
    # True: the network also takes its own estimate of the clean particles from a first call
    # (self-conditioning; a second network call in half the training steps and none more in sampling);
    # needs model.schedule=fixed_linear
    self_condition: bool = False
    bfloat16: bool = False  # bfloat16 compute, float32 parameters


@dataclass
class TrainConfig:
    """Optimisation: AdamW, warmup + cosine decay, gradient clipping, EMA of the parameters."""

    steps: int = 20_000
    batch_size: int = 256  # global batch, split over all devices
    learning_rate: float = 3e-4
    warmup_steps: int = 1_000
    weight_decay: float = 1e-4
    grad_clip: float = 1.0
    # Reached after ~9 000 steps (0.999) or ~90 000 (0.9999): before, the decay is (1 + n) / (10 + n)
    ema_decay: float = 0.999
    log_every: int = 50
    val_every: int = 1_000
    checkpoint_every: int = 1_000
    keep_checkpoints: int = 3  # the latest k are kept, and the best by val NELBO besides
    val_jets: int = 2_048  # val sets scored for the NELBO (the first ones of the val split)
    val_nelbo_samples: int = 4  # Monte-Carlo time samples per set for the val NELBO
    padding_aware: bool = True  # cut each batch to its largest multiplicity (rounded up to a bucket)
    # > 0: sort each run of this many batches by multiplicity before forming batches, so sets of
    # similar size share one and padding-aware cuts save more (up to 150 particles: try 16)
    multiplicity_window: int = 0
    # Jets shuffled together and held in memory at a time (divided among the processes): the
    # input's memory is about this many jets, whatever the train split's size
    window_jets: int = 262_144
    # Contiguous parts of each window shuffled apart into their columns of every batch; 0: one per
    # process, so that each process reads only its own part of the file
    input_shares: int = 0


@dataclass
class SampleConfig:
    """Generation from the trained model's EMA parameters."""

    n_jets: int = 10_000  # per class
    sampler: Sampler = Sampler.heun
    steps: int = 50
    # Spacing of the noise levels: EDM's with this exponent (Karras et al. 2022, eq. 5), or equal steps of
    # log sigma with 0. 7 over 0 on the full-size fidelity benchmark: W1P 1.3-1.5x lower at equal cost
    # (benchmarks/README.md).
    rho: float = 7.0
    # EDM's stochastic sampler (setdiff.sampling): the noise level raised by this fraction before every
    # ddim or heun step; 0 samples deterministically
    churn: float = 0.0
    guidance_scale: float = 0.0
    batch_size: int = 1_024
    masks: MaskSource = MaskSource.train
    checkpoint: CheckpointChoice = CheckpointChoice.best
    rescale_pt_rel: bool = True  # scale each jet's pt_rel to add up to its template jet's, as its multiplicity is copied


@dataclass
class EvaluateConfig:
    """Physics metrics; defaults follow Kansal et al. 2021 (arXiv:2106.11535) and 2023 (arXiv:2211.10295)."""

    n_jets: int = 50_000  # jets drawn (with replacement) per bootstrap batch of the W1 metrics
    w1_batches: int = 5
    fpd_min_jets: int = 20_000  # FPD: batch sizes evenly spaced in 1/N between these two
    fpd_max_jets: int = 50_000
    fpd_points: int = 10  # batch sizes the 1/N fit uses
    fpd_batches: int = 20  # batches averaged at each batch size
    kpd_batches: int = 10
    kpd_jets: int = 5_000  # jets per KPD batch
    cov_mmd_jets: int = 100  # jets per coverage/MMD batch (EMD between every pair)
    cov_mmd_batches: int = 10
    emd_jobs: int = 0  # threads computing EMDs (energyflow); 0: one per CPU core
    per_class: bool = True  # also score each class on its own
    max_jets: int = 150_000  # jets read from each file at most (a seeded random subset); EFPs take ~1 ms a jet
    samples: str | None = None  # any sets file; default: this experiment's samples
    reference: str | None = None  # any sets file; default: this dataset's test split
    truth: str | None = None  # the "truth" floor compares reference with this; default: the train split


@dataclass
class LikelihoodConfig:
    """Per-jet negative log-likelihood bound (nats) of a sets file under the trained model, and anomaly detection with it."""

    sets: str | None = None  # the sets file to score; default: this dataset's test split
    n_samples: int = 16  # stratified diffusion times per jet in the NELBO estimate
    batch_size: int = 512


@dataclass
class ToyConfig:
    """The toy stage's check of the model on square rings (``pipeline.toy``)."""

    steps: int = "${train.steps}"  # training steps on the rings


@dataclass
class Config:
    """One pipeline experiment: its name, seed, where its results go, and every stage's settings."""

    name: str = MISSING  # the experiment's name; also its MLflow experiment
    seed: int = 0
    results_dir: str = "results/${safe_name:name,${name}}"
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    sample: SampleConfig = field(default_factory=SampleConfig)
    evaluate: EvaluateConfig = field(default_factory=EvaluateConfig)
    likelihood: LikelihoodConfig = field(default_factory=LikelihoodConfig)
    toy: ToyConfig = field(default_factory=ToyConfig)


ConfigStore.instance().store(name="schema", node=Config)
