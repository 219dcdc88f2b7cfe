# Shared by all rules: the experiments to run, their Hydra overrides, and the id that ties together
# every MLflow run of one workflow execution (tag `pipeline.execution`).
import os
import shlex
import uuid

EXPERIMENTS = list(config["experiments"])
# With --use-conda every job runs in this named environment, made once from environment.yml
# (`conda env create -f environment.yml`); without it, jobs use the current Python.
CONDA_ENV = "jet-setdiff"
os.environ.setdefault("PIPELINE_EXECUTION_ID", uuid.uuid4().hex)


envvars:
    "PIPELINE_EXECUTION_ID",


def hydra_args(wildcards):
    """The preset and extra overrides of one experiment, quoted for the shell."""
    overrides = [f"experiment={wildcards.experiment}", *config["experiments"][wildcards.experiment]]
    return " ".join(shlex.quote(override) for override in overrides)
