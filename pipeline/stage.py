"""What every stage does around its own work: output folder, saved config, MLflow run, user errors.

A stage module looks like::

    @hydra.main(config_path="conf", config_name="config", version_base="1.3")
    def main(cfg):
        with stage("toy", cfg) as output_dir:
            ...  # write into output_dir, log to the active MLflow run

Its outputs land in ``results/<experiment>/<stage>/`` (Hydra's run dir; a sweep gets one folder per
job), next to ``config.yaml``, the fully resolved config that produced them. That file is written
only when the stage succeeds, so a failed or stopped stage leaves the folder's outputs and their
config as they were: the config always describes the outputs beside it.
"""

from __future__ import annotations

import atexit
import gc
import os
import sys
from contextlib import contextmanager
from pathlib import Path

from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from .config import check_names
from .files import PipelineError, write_config
from .tracking import stage_run


@contextmanager
def stage(name: str, cfg: DictConfig, output_dir: str | os.PathLike | None = None, config_file: str = "config.yaml",
          *, resume_run_id: str | None = None, label: str | None = None):
    """Run one execution of stage ``name``: yields its output folder, inside an MLflow run.

    The output folder is Hydra's run dir unless ``output_dir`` is given (the data stages write
    under ``data/``, shared by every experiment). The resolved config is written there as
    ``config_file`` (atomically) when the block succeeds, never before: a stage that fails into a
    folder holding earlier outputs leaves their config in place. A ``PipelineError`` is reported as
    one line on stderr and exit status 2 (the MLflow run is marked FAILED). ``resume_run_id``
    continues an earlier MLflow run.

    The MLflow run is named ``name``, then ``label`` if given (``generate g/0``: which part of the
    work this execution did); an experiment's own stages whose results folder is not named after its
    MLflow experiment (a point of a workflow sweep, ``results/demo_lr_1``) add the folder's name
    (``train demo_lr_1``), so the runs of a sweep tell apart in the MLflow UI.
    """
    exit_without_a_final_collection()
    try:  # before any folder, file or run: the names become paths
        check_names(cfg)
    except ValueError as error:
        print(f"{name}: error: {error}", file=sys.stderr)
        raise SystemExit(2) from None
    results = Path(cfg.results_dir).name
    run_name = " ".join(part for part in (name, label) if part)
    if output_dir is None and results != cfg.name:
        run_name += f" {results}"
    output_dir = Path(output_dir if output_dir is not None else HydraConfig.get().runtime.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    try:
        with stage_run(cfg.name, run_name, cfg, stage=name, resume_run_id=resume_run_id):
            yield output_dir
            write_config(cfg, output_dir / config_file)
    except PipelineError as error:
        print(f"{name}: error: {error}", file=sys.stderr)
        raise SystemExit(2) from None


def exit_without_a_final_collection() -> None:
    """Spare this process the garbage collection that Python runs over every live object at exit.

    While the interpreter tears its modules down it runs the cyclic collector over everything they
    hold; after MLflow, JAX, Flax and orbax a tiny training spends ~1 s of its ~6.5 s there, and
    ~0.1 s with ``gc.freeze()`` run first, which moves every object out of the collector's reach
    (``benchmarks/bench_stage_exit.py``). Every stage process pays it, for memory the operating
    system takes back anyway. Nothing a stage writes depends on that collection: files are closed by
    their ``with`` blocks, checkpoints are saved synchronously, the MLflow run is ended by
    :func:`stage`, and the other exit handlers (MLflow's, ``weakref.finalize``'s) still run.
    Registered once however often it is called (a Hydra multirun enters :func:`stage` per job).
    """
    atexit.unregister(gc.freeze)
    atexit.register(gc.freeze)
