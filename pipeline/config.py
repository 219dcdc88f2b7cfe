"""The configuration schema: structured-config dataclasses registered with Hydra.

Every stage composes ``pipeline/conf/config.yaml`` on top of ``Config``. Because the dataclasses are
the schema, an unknown key (``model.d_modle=64``) or a wrong type (``model.d_model=abc``) is refused
by Hydra while composing, before any work starts, with a message that names the key. Groups:
``data/``, ``model/``, ``train/``, ``sample/``, ``evaluate/`` and ``experiment/`` (presets that set
several groups at once, e.g. ``experiment=demo``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING

from setdiff.schedules import GAMMA_MAX, GAMMA_MIN

# The particle features of the sets file, in order (see shared DESIGN.md, "The sets file").
PARTICLE_FEATURES = ["eta_rel", "phi_rel", "pt_rel"]
JET_FEATURES = ["pt", "eta", "mass", "n_particles"]


class Schedule(Enum):
    """Noise schedules of ``setdiff.schedules.SCHEDULES``."""

    fixed_linear = "fixed_linear"
    learned_linear = "learned_linear"
    learned_monotonic = "learned_monotonic"


class Sampler(Enum):
    """Samplers of ``setdiff.sampling.SAMPLERS``."""

    ancestral = "ancestral"
    ddim = "ddim"
    heun = "heun"


class MaskSource(Enum):
    """Where generated jets take their multiplicities from."""

    train = "train"  # drawn from the train split's multiplicity distribution, per class
    test = "test"  # the test split's masks, one for one


@dataclass
class DataConfig:
    """A jet dataset: where its raw and processed files live and what its sets look like."""

    name: str = MISSING
    n_max: int = 30  # particles kept per jet (highest pt_rel first)
    class_names: list[str] = field(default_factory=lambda: ["g", "q", "t"])
    feature_names: list[str] = field(default_factory=lambda: list(PARTICLE_FEATURES))
    jet_feature_names: list[str] = field(default_factory=lambda: list(JET_FEATURES))
    raw_dir: str = "data/raw/${.name}"
    processed_dir: str = "data/processed/${.name}"


@dataclass
class ModelConfig:
    """The transformer-guided VDM (``setdiff.VDM`` with a ``setdiff.ScoreNet``)."""

    d_model: int = 128
    n_layers: int = 4
    n_heads: int = 4
    mlp_ratio: int = 4
    n_inducing: int = 0  # 0: full masked self-attention; >0: ISAB with this many inducing points
    schedule: Schedule = Schedule.learned_linear
    gamma_min: float = GAMMA_MIN
    gamma_max: float = GAMMA_MAX
    timesteps: int = 0  # 0: continuous-time bound; T > 0: discrete-time bound with T steps
    cond_drop_prob: float = 0.1  # classifier-free guidance dropout of the class / context
    latent_dim: int = 0  # 0: diffuse the features; >0: latent diffusion with this width
    use_jet_context: bool = False  # also condition on (pt, eta, mass, n_particles)
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
    ema_decay: float = 0.999
    log_every: int = 50
    val_every: int = 1_000
    checkpoint_every: int = 1_000
    keep_checkpoints: int = 3


@dataclass
class SampleConfig:
    """Generation from the trained model's EMA parameters."""

    n_jets: int = 10_000  # per class
    sampler: Sampler = Sampler.heun
    steps: int = 50
    guidance_scale: float = 0.0
    batch_size: int = 1_024
    masks: MaskSource = MaskSource.train


@dataclass
class EvaluateConfig:
    """Physics metrics; defaults follow Kansal et al. 2021 (arXiv:2106.11535) and 2023 (arXiv:2211.10295)."""

    n_jets: int = 50_000
    w1_batches: int = 5
    samples: str | None = None  # any sets file; default: this experiment's samples
    reference: str | None = None  # any sets file; default: this dataset's test split


@dataclass
class Config:
    """One pipeline experiment: its name, seed, where its results go, and every stage's settings."""

    name: str = MISSING  # the experiment's name; also its MLflow experiment
    seed: int = 0
    results_dir: str = "results/${name}"
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    sample: SampleConfig = field(default_factory=SampleConfig)
    evaluate: EvaluateConfig = field(default_factory=EvaluateConfig)


ConfigStore.instance().store(name="schema", node=Config)
