# Shared by all rules: the experiments to run, their Hydra overrides, and the id that ties together
# every MLflow run of one workflow execution (tag `pipeline.execution`).
import os
import shlex
import uuid

EXPERIMENTS = list(config["experiments"])
os.environ.setdefault("PIPELINE_EXECUTION_ID", uuid.uuid4().hex)


envvars:
    "PIPELINE_EXECUTION_ID",


def hydra_args(wildcards):
    """The preset and extra overrides of one experiment, quoted for the shell."""
    overrides = [f"experiment={wildcards.experiment}", *config["experiments"][wildcards.experiment]]
    return " ".join(shlex.quote(override) for override in overrides)
