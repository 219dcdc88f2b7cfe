"""Training stage: data-parallel training of the transformer-guided VDM on a processed jet dataset.

``python -m pipeline.train experiment=<name> [overrides]`` trains ``setdiff``'s VDM (Kingma et al.
2021, arXiv:2107.00630) on ``data.processed_dir/train.h5`` (batches: ``pipeline.input_pipeline``)
with ``jax.pmap`` over every local device: the state is replicated, each device takes a shard of
the global batch, and ``setdiff.train_step`` sums gradients and metrics over the ``devices`` axis,
so any number of devices makes the update of one device with the whole batch (every set draws its
noise from its global index). A batch's loss is divided by the real dimensions of an average batch
of the train split (from ``normalisation.json``), so every particle weighs the same in every batch,
however ``train.multiplicity_window`` groups them.
Under SLURM with several tasks, or with ``JAX_COORDINATOR_ADDRESS``, ``JAX_NUM_PROCESSES`` and
``JAX_PROCESS_ID`` set, the processes first join with ``jax.distributed.initialize()``; each reads
its own rows of every batch, and only process 0 logs to MLflow.

Optimiser: AdamW, linear warmup then cosine decay, global-norm clipping; an EMA of the parameters
is kept for sampling and validation. Every ``train.val_every`` steps the val NELBO (bits per
dimension, EMA parameters, fixed sets and noise) is computed; orbax keeps the latest
``train.keep_checkpoints`` checkpoints and the best by val NELBO.

Resuming: running the same command again continues from the latest checkpoint, in the same MLflow
run. The batch and the noise of step ``s`` depend only on the seed and ``s``, so a resumed run
computes exactly the steps of an uninterrupted one. A resume may change the settings in
``RESUMABLE_CHANGES`` (the length of the run, the optimiser's hyperparameters, the cadences); the
run's params keep their first values, so each change is recorded as the MLflow tag
``resume.<step>.<setting>`` (``before -> now``) and in the log. SIGTERM or SIGUSR1 (what SLURM
sends before preemption or the time limit) saves a checkpoint during the training loop, and exits
with status 128 + the signal number (before the loop, the stage stops at once; its MLflow run ends
KILLED either way). A NaN or infinite loss stops the run with the step it happened at; checkpoints
are only written after the losses since the previous one were checked, so the last one is good.

Outputs in ``results/<experiment>/train/``: ``checkpoints/{latest,best}/<step>/``,
``checkpoint.json`` (the final step, the paths of the latest and best checkpoints, the best val
NELBO, the MLflow run) and ``config.yaml``, the settings of the latest checkpoint (rewritten with
every checkpoint, so a resume compares against the settings in use).
"""

from __future__ import annotations

import json
import os
import signal
import sys
import threading
import time
from functools import partial
from pathlib import Path

import hydra
import jax
import mlflow
import numpy as np
from omegaconf import DictConfig, OmegaConf
from tqdm import tqdm

from setdiff import create_train_state, learning_rate_schedule, make_optimizer, nelbo, train_step

from .background import in_background
from .checkpoints import Checkpoints, latest_checkpoint_step
from .config import CondDrop, Config, ModelConfig, TrainConfig
from .input_pipeline import SetsSplit, TrainBatches
from .model import build_vdm
from .files import PipelineError, atomic_output, write_config
from .stage import exit_without_a_final_collection, stage
from .sets import count_jets
from .tracking import READ, STOP_SIGNALS, WRITTEN, FileDataset, Interrupted, flatten_config, log_files, received_stop_signal

AXIS = "devices"


class TrainingPace:
    """Seconds per training step in this run so far (validation and checkpoints not counted), and
    the time the remaining steps will take at that pace. The first interval holds the compilation
    of the training step, so it is left out as soon as a later one has been timed."""

    def __init__(self):
        self.intervals: list[tuple[int, float]] = []  # (steps, seconds)

    def add(self, steps: int, seconds: float) -> None:
        self.intervals.append((steps, seconds))

    def eta(self, remaining_steps: int) -> str:
        """``h:mm:ss`` or ``mm:ss``, as tqdm's bar writes it."""
        timed = self.intervals[1:] or self.intervals
        steps, seconds = sum(steps for steps, _ in timed), sum(seconds for _, seconds in timed)
        return tqdm.format_interval(remaining_steps * seconds / max(steps, 1))


# Settings that may change when a run is resumed. The data's location and the cadences leave the
# training as it was; the length and the optimiser's hyperparameters change it from the resume on
# (train.steps and train.warmup_steps reshape the learning-rate schedule), and the checkpointed
# optimiser state still fits: make_optimizer's state holds Adam's moments and the step count, the
# same tree whatever these values. Any other change (the model, the data, the seed, the batch)
# would make the checkpoint belong to a different run.
RESUMABLE_CHANGES = ("train.steps", "train.learning_rate", "train.warmup_steps", "train.weight_decay",
                     "train.grad_clip", "train.log_every", "train.val_every", "train.checkpoint_every",
                     "train.keep_checkpoints", "data.raw_dir", "data.processed_dir")


def settings_changed_on_resume(previous_config: Path, cfg: DictConfig) -> dict[str, tuple[str, str]]:
    """The training settings ``cfg`` changes from ``previous_config`` (those of the checkpoints to
    resume), as ``{key: (before, now)}``. Refuses a change outside ``RESUMABLE_CHANGES``: the
    checkpoints would belong to another model."""
    def training_settings(config) -> dict:
        return {key: value for key, value in flatten_config(config).items() if key.split(".")[0] in ("data", "model", "train", "seed")}

    # A model or train key that the earlier run's config lacks was added to the pipeline since, with the
    # behaviour before it as its default: that run had the default.
    added_since = flatten_config({"model": OmegaConf.structured(ModelConfig), "train": OmegaConf.structured(TrainConfig)})
    before, now = {**added_since, **training_settings(OmegaConf.load(previous_config))}, training_settings(cfg)
    changed = {key: (before.get(key, "unset"), now.get(key, "unset"))
               for key in sorted(before.keys() | now.keys()) if before.get(key) != now.get(key)}
    refused = [key for key in changed if key not in RESUMABLE_CHANGES]
    if refused:
        details = ", ".join(f"{key} {changed[key][0]} -> {changed[key][1]}" for key in refused[:3])
        raise PipelineError(
            f"{previous_config.parent} holds checkpoints of a run with other settings ({details}); "
            "run with the same settings to resume it, or delete that folder (or set results_dir) to start afresh."
        )
    return changed


def record_resume(step: int, changes: dict[str, tuple[str, str]]) -> None:
    """Say in the log, and in the active MLflow run as tags ``resume.<step>.<setting>``, which
    settings differ from those of the checkpoint of ``step`` that training resumes from (the run's
    params keep their first values). A later resume from the same step replaces its tags: they
    describe the settings the steps after it were made with."""
    print(f"train: resuming from the checkpoint of step {step}"
          + "".join(f"; {key} {before} -> {now}" for key, (before, now) in changes.items()), flush=True)
    if changes:
        mlflow.set_tags({f"resume.{step}.{key}": f"{before} -> {now}" for key, (before, now) in changes.items()})


def join_processes() -> None:
    """Join the other processes of a multi-process job, before any device is touched."""
    # Collectives between processes on CPUs (a test, a CPU cluster); GPUs use NCCL regardless.
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    if "JAX_COORDINATOR_ADDRESS" in os.environ:
        jax.distributed.initialize(
            coordinator_address=os.environ["JAX_COORDINATOR_ADDRESS"],
            num_processes=int(os.environ["JAX_NUM_PROCESSES"]),
            process_id=int(os.environ["JAX_PROCESS_ID"]),
        )
    elif int(os.environ.get("SLURM_NTASKS", "1")) > 1:
        jax.distributed.initialize()  # JAX reads the SLURM environment (srun's tasks: the train rule's launcher)
    if jax.process_count() > 1:
        print(f"train: process {jax.process_index()} of {jax.process_count()}, "
              f"{jax.local_device_count()} of {jax.device_count()} devices", flush=True)


def replicate(tree):
    """One copy of ``tree`` on every local device (leading axis), as ``pmap`` takes it. Placed by a
    ``pmap`` over the training step's axis name, so it has the sharding of the step's own outputs:
    feeding those back then reuses the first compilation instead of compiling the step again."""
    n = jax.local_device_count()
    return jax.pmap(lambda x: x, axis_name=AXIS)(jax.tree.map(lambda leaf: np.broadcast_to(np.asarray(leaf), (n, *np.shape(leaf))), tree))


def unreplicate(tree):
    """The host copy of a replicated tree: this process's first device's copy, read without any
    computation (indexing a ``pmap`` output would launch one across every process)."""
    return jax.tree.map(lambda leaf: np.asarray(leaf.addressable_data(0)).reshape(leaf.shape[1:]), tree)


class StopRequest:
    """Remembers SIGTERM / SIGUSR1 so the training loop can save and stop between steps; the
    handlers it replaces (the stage's, which stop at once) come back after the loop."""

    def __init__(self):
        self.signal: int | None = None

    def __enter__(self):
        self.previous = {number: signal.signal(number, self._handle) for number in STOP_SIGNALS}
        if (number := received_stop_signal()) is not None:
            # It arrived while the run was set up and its exception was dropped on the way (in a
            # weakref callback or ``__del__``): nothing trained yet, so nothing to save; stop now.
            self.__exit__()
            raise Interrupted(128 + number)
        return self

    def _handle(self, number, frame):
        self.signal = number

    def __exit__(self, *exc):
        for number, handler in self.previous.items():
            signal.signal(number, handler)


def val_nelbo_scorer(model, split: SetsSplit, n_sets: int, batch_size: int, n_samples: int, seed: int):
    """A function of the parameters giving the mean NELBO (bits per dimension) of the first
    ``n_sets`` sets of ``split``. Every batch draws its own times and noise, and the same ones at
    every call, so scores compare across steps without each batch repeating the first one's draws."""
    score = jax.jit(lambda params, batch, key: nelbo(model, params, key, batch["x"], batch["mask"], batch["labels"],
                                                     batch.get("context"), n_samples=n_samples))
    rows = np.arange(min(n_sets, len(split)))
    batches = [split.rows(rows[start : start + batch_size], split.mask.shape[1]) for start in range(0, len(rows), batch_size)]
    keys = [jax.random.fold_in(jax.random.PRNGKey(seed), index) for index in range(len(batches))]

    def mean_nelbo(params) -> float:
        return float(np.concatenate([np.asarray(score(params, batch, key)) for batch, key in zip(batches, keys)]).mean())

    return mean_nelbo


def train(cfg: DictConfig, output_dir: Path, primary: bool, progress: bool = True) -> dict:
    """Train to ``cfg.train.steps`` steps, from the latest checkpoint in ``output_dir`` if any.
    Returns a summary: final step, checkpoint paths, best val NELBO."""
    processed = Path(cfg.data.processed_dir)
    for name in ("train.h5", "val.h5", "normalisation.json"):
        if not (processed / name).is_file():
            raise PipelineError(f"{processed / name} does not exist; run `python -m pipeline.preprocess data={cfg.data.name}` first.")
    use_context = cfg.model.use_jet_context
    if CondDrop(cfg.model.cond_drop) is CondDrop.context and not use_context:
        raise PipelineError("model.cond_drop=context drops the jet features, which a model without them does not see; "
                            "set model.use_jet_context=true or model.cond_drop=class_and_context.")
    val_rows = np.arange(min(cfg.train.val_jets, count_jets(processed / "val.h5")))  # only the sets scored are read
    val_split = SetsSplit(processed / "val.h5", processed / "normalisation.json", use_context, cfg.model.log_pt_rel, rows=val_rows,
                          context_pt_rel_sum=cfg.model.context_pt_rel_sum, context_kept_mass=cfg.model.context_kept_mass)
    batches = TrainBatches(processed / "train.h5", processed / "normalisation.json", use_context, cfg.model.log_pt_rel,
                           cfg.train.batch_size, cfg.seed, jax.local_device_count(), jax.process_index(), jax.process_count(),
                           cfg.train.padding_aware, cfg.train.multiplicity_window, cfg.train.window_jets,
                           cfg.train.input_shares, context_pt_rel_sum=cfg.model.context_pt_rel_sum,
                           context_kept_mass=cfg.model.context_kept_mass)
    data_dim = len(val_split.feature_names)
    model = build_vdm(cfg.model, data_dim=data_dim, n_classes=len(val_split.class_names))
    train_cfg = cfg.train
    optimizer = make_optimizer(train_cfg.learning_rate, train_cfg.steps, train_cfg.warmup_steps, train_cfg.weight_decay, train_cfg.grad_clip)
    schedule = learning_rate_schedule(train_cfg.learning_rate, train_cfg.steps, train_cfg.warmup_steps)
    init_key, noise_key = jax.random.split(jax.random.PRNGKey(cfg.seed))
    example = {name: array[0] for name, array in batches(0).items()}
    state = jax.device_get(create_train_state(model, init_key, example, optimizer))
    checkpoints = Checkpoints(output_dir, train_cfg.keep_checkpoints)
    state = checkpoints.restore_latest(state) or state
    start_step = int(state.step)
    replicated = replicate(state)
    # Every real dimension weighs the same in every batch (train_step): the loss of a batch is
    # divided by the dimensions an average batch of the train split holds, not by its own count.
    normalisation = json.loads((processed / "normalisation.json").read_text())
    dims_per_batch = train_cfg.batch_size * normalisation["n_train_particles"] / normalisation["n_train_jets"] * data_dim
    p_train_step = jax.pmap(
        partial(train_step, model=model, optimizer=optimizer, ema_decay=train_cfg.ema_decay, axis_name=AXIS,
                dims_per_batch=dims_per_batch),
        axis_name=AXIS, donate_argnums=(0,),
    )
    validate = val_nelbo_scorer(model, val_split, train_cfg.val_jets, train_cfg.batch_size, train_cfg.val_nelbo_samples, cfg.seed)
    n_local = jax.local_device_count()
    interactive = progress and sys.stderr.isatty()
    pending: list[tuple[int, dict]] = []  # (step, device metrics) not yet checked and logged
    pace = TrainingPace()
    stop = threading.Event()
    upcoming = in_background(((step, batches(step)) for step in range(start_step, train_cfg.steps)), stop)

    def save_checkpoint(step: int, val_nelbo: float | None = None) -> None:
        """Checkpoint the current state as ``step``; process 0 first writes ``config.yaml``, the
        settings it is made with, which the next resume compares against."""
        if primary:
            write_config(cfg, output_dir / "config.yaml")
        checkpoints.save(step, unreplicate(replicated), val_nelbo)

    def check_and_log(seconds: float) -> None:
        """Fetch the pending metrics, stop on a non-finite loss, log them (process 0)."""
        if not pending:
            return
        fetched = [unreplicate(metrics) for _, metrics in pending]  # averaged with pmean: every device holds the same
        for (step, _), metrics in zip(pending, fetched):
            loss = float(metrics["loss_bpd"])
            if not np.isfinite(loss):
                good = checkpoints.latest.latest_step()
                if good is None:
                    raise PipelineError(
                        f"the loss became {loss} at step {step + 1}, before any checkpoint was written: "
                        "lower train.learning_rate or check the data, then run again to start afresh."
                    )
                raise PipelineError(
                    f"the loss became {loss} at step {step + 1}; the last good checkpoint (step {good}) is intact: "
                    "lower train.learning_rate or check the data, then run again to resume from it."
                )
        last_step = pending[-1][0] + 1
        values = {name: float(value) for name, value in fetched[-1].items()}
        # One batch's loss swings with the noise levels it drew; the mean since the last line shows the trend.
        values["loss_bpd_smoothed"] = float(np.mean([float(metrics["loss_bpd"]) for metrics in fetched]))
        values["learning_rate"] = float(schedule(last_step - 1))
        values["jets_per_s"] = len(pending) * train_cfg.batch_size / max(seconds, 1e-9)
        pace.add(len(pending), seconds)
        if primary:
            mlflow.log_metrics(values, step=last_step)
            if not interactive:
                print(f"train: step {last_step}/{train_cfg.steps} loss {values['loss_bpd_smoothed']:.4f} bpd "
                      f"(mean of {len(pending)} steps; last {values['loss_bpd']:.4f}), "
                      f"{values['jets_per_s']:.0f} jets/s, ETA {pace.eta(train_cfg.steps - last_step)}", flush=True)
        bar.set_postfix(loss=f"{values['loss_bpd_smoothed']:.3f}", jets_per_s=f"{values['jets_per_s']:.0f}")
        pending.clear()

    with StopRequest() as stop_request, tqdm(total=train_cfg.steps, initial=start_step, desc="train", unit="step",
                                             disable=not interactive) as bar:
        try:
            interval_start = time.perf_counter()
            for step, batch in upcoming:
                if stop_request.signal is not None:
                    check_and_log(time.perf_counter() - interval_start)
                    save_checkpoint(step)
                    raise Interrupted(128 + stop_request.signal)
                rng = np.broadcast_to(np.asarray(jax.random.fold_in(noise_key, step)), (n_local, 2))
                replicated, metrics = p_train_step(replicated, batch, rng)
                pending.append((step, metrics))
                bar.update(1)
                done = step + 1
                at = lambda every: done % every == 0 or done == train_cfg.steps  # noqa: E731
                if not (at(train_cfg.log_every) or at(train_cfg.val_every) or at(train_cfg.checkpoint_every)):
                    continue
                check_and_log(time.perf_counter() - interval_start)
                val_nelbo = None
                if at(train_cfg.val_every):
                    val_nelbo = validate(unreplicate(replicated.ema_params))
                    if primary:
                        mlflow.log_metric("val_nelbo_bpd", val_nelbo, step=done)
                if at(train_cfg.checkpoint_every) or val_nelbo is not None:
                    save_checkpoint(done, val_nelbo)
                interval_start = time.perf_counter()  # throughput counts training steps only
        finally:
            stop.set()
    final_step = int(unreplicate(replicated.step))
    if start_step >= train_cfg.steps:
        print(f"train: already at step {final_step} of {train_cfg.steps}; nothing to do", flush=True)
    return {"step": final_step, **checkpoints.summary(),
            "processes": jax.process_count(), "devices": jax.device_count()}


@hydra.main(config_path="conf", config_name="config", version_base="1.3")
def main(cfg: Config) -> None:
    join_processes()
    output_dir = Path(hydra.core.hydra_config.HydraConfig.get().runtime.output_dir)
    run_id_file = output_dir / "mlflow_run_id"
    resume_step = latest_checkpoint_step(output_dir)
    resume = run_id_file.read_text().strip() if run_id_file.exists() and resume_step is not None else None
    try:
        changes = settings_changed_on_resume(output_dir / "config.yaml", cfg) if resume else {}
        if jax.process_index() != 0:  # a helper of process 0: trains, neither logs nor writes outputs
            exit_without_a_final_collection()
            train(cfg, output_dir, primary=False, progress=False)
            return
    except PipelineError as error:
        print(f"train: error: {error}", file=sys.stderr)
        raise SystemExit(2) from None
    with stage("train", cfg, resume_run_id=resume) as output_dir:
        with atomic_output(run_id_file) as file:
            file.write(mlflow.active_run().info.run_id)
        if resume:
            record_resume(resume_step, changes)
        summary = train(cfg, output_dir, primary=True)
        summary["mlflow_run_id"] = mlflow.active_run().info.run_id
        with atomic_output(output_dir / "checkpoint.json") as file:
            json.dump(summary, file, indent=2)
        mlflow.log_dict(summary, "checkpoint.json")
        processed = Path(cfg.data.processed_dir)
        log_files(READ, [*(FileDataset(processed / f"{split}.h5", count_jets(processed / f"{split}.h5")) for split in ("train", "val")),
                         FileDataset(processed / "normalisation.json")])
        log_files(WRITTEN, [FileDataset(output_dir / "checkpoint.json")])
        print(f"train: step {summary['step']}; latest checkpoint {summary['latest']}; best {summary['best']} "
              f"(val NELBO {summary['best_val_nelbo_bpd']})")


if __name__ == "__main__":
    main()
