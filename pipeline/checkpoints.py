"""Training checkpoints: where ``pipeline.train`` keeps them and how later stages load the model.

``<results>/train/checkpoints/latest`` holds the latest ``train.keep_checkpoints`` states and
``checkpoints/best`` the one with the lowest val NELBO (orbax ``CheckpointManager``s); each state is
a tree ``step, params, ema_params, opt_state``. ``<results>/train/checkpoint.json`` names the latest
and the best, and the training run's ``config.yaml`` beside it says how to rebuild the network.
"""

from __future__ import annotations

import json
from pathlib import Path

import orbax.checkpoint as ocp
from omegaconf import DictConfig, OmegaConf

from .config import CheckpointChoice, ModelConfig
from .files import PipelineError
from .model import build_vdm


def latest_checkpoint_step(output_dir: Path) -> int | None:
    """The step of the latest checkpoint that :class:`Checkpoints` wrote in ``output_dir``, or
    ``None`` when there is none (not started, or stopped before its first checkpoint)."""
    folder = output_dir / "checkpoints" / "latest"
    return max(ocp.utils.checkpoint_steps(folder), default=None) if folder.is_dir() else None


class Checkpoints:
    """The latest ``keep`` checkpoints and the best one by val NELBO (orbax ``CheckpointManager``s),
    in ``<output_dir>/checkpoints``."""

    def __init__(self, output_dir: Path, keep: int):
        self.directory = (output_dir / "checkpoints").absolute()
        self.latest = ocp.CheckpointManager(
            self.directory / "latest", options=ocp.CheckpointManagerOptions(max_to_keep=keep, enable_async_checkpointing=False)
        )
        self.best = ocp.CheckpointManager(
            self.directory / "best",
            options=ocp.CheckpointManagerOptions(
                max_to_keep=1, best_fn=lambda metrics: metrics["val_nelbo_bpd"], best_mode="min", enable_async_checkpointing=False,
            ),
        )

    def save(self, step: int, state, val_nelbo: float | None = None) -> None:
        if self.latest.latest_step() != step:
            self.latest.save(step, args=ocp.args.StandardSave(state))
        if val_nelbo is not None and self.best.latest_step() != step:
            self.best.save(step, args=ocp.args.StandardSave(state), metrics={"val_nelbo_bpd": val_nelbo})

    def restore_latest(self, like):
        """The latest saved state (shaped like ``like``), or ``None`` when there is none."""
        step = self.latest.latest_step()
        return None if step is None else self.latest.restore(step, args=ocp.args.StandardRestore(like))

    def summary(self) -> dict:
        """The paths of the latest and the best checkpoint, and the best's val NELBO (bits per
        dimension), over every run that wrote into this folder; ``None`` for what does not exist."""
        latest, best = self.latest.latest_step(), self.best.best_step()
        return {
            "latest": None if latest is None else str(self.directory / "latest" / str(latest)),
            "best": None if best is None else str(self.directory / "best" / str(best)),
            "best_val_nelbo_bpd": None if best is None else float(self.best.metrics(best)["val_nelbo_bpd"]),
        }


def load_checkpoint(path) -> dict:
    """A saved training state as a tree of numpy arrays (``step, params, ema_params, opt_state``),
    from a checkpoint folder named in ``checkpoint.json``."""
    return ocp.StandardCheckpointer().restore(Path(path).absolute() / "default")  # CheckpointManager's item name


def trained_model(cfg: DictConfig, data_dim: int, n_classes: int):
    """The training run's model and its EMA parameters (``sample.checkpoint``: best or latest)."""
    train_dir = Path(cfg.results_dir) / "train"
    summary_path = train_dir / "checkpoint.json"
    if not summary_path.is_file():
        raise PipelineError(f"{summary_path} does not exist; train the model first (`python -m pipeline.train experiment={cfg.name}`).")
    summary = json.loads(summary_path.read_text())
    choice = CheckpointChoice(cfg.sample.checkpoint)
    path = summary.get(choice.value) or summary.get("latest")
    if not path or not Path(path).exists():
        raise PipelineError(f"{summary_path} names no existing checkpoint ({path}); train the model again.")
    model_cfg = OmegaConf.merge(OmegaConf.structured(ModelConfig), OmegaConf.load(train_dir / "config.yaml").model)
    # These decide how the data is read, before the model is built
    for key in ("log_pt_rel", "use_jet_context", "context_pt_rel_sum", "context_kept_mass"):
        if model_cfg[key] != cfg.model[key]:
            raise PipelineError(f"the model in {train_dir} was trained with model.{key}={model_cfg[key]}, not {cfg.model[key]}; "
                                f"run with model.{key}={model_cfg[key]}.")
    model = build_vdm(model_cfg, data_dim=data_dim, n_classes=n_classes)
    return model, load_checkpoint(path)["ema_params"], path
