# Shared by all rules: the experiments to run, their Hydra configs, the datasets they need, and the
# id that ties together every MLflow run of one workflow execution (tag `pipeline.execution`).
import os
import shlex
import uuid
from pathlib import Path

from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

import pipeline
from pipeline.config import Source

EXPERIMENTS = list(config["experiments"])
os.environ.setdefault("PIPELINE_EXECUTION_ID", uuid.uuid4().hex)


envvars:
    "PIPELINE_EXECUTION_ID",


# The config groups a stage reads: each rule passes only the overrides of the groups its stage and
# the stages before it read (and those of no group, e.g. seed), so that changing an evaluate
# setting reruns evaluate, a train setting train and what follows it, and nothing upstream.
STAGE_GROUPS = ("data", "model", "train", "sample", "evaluate", "likelihood")


def override_group(override):
    """The config group an override sets: ``train`` for ``train.steps=5``, ``model`` for ``model=small``."""
    key = override.lstrip("+~").split("=", 1)[0]
    return key.split("@", 1)[0].split(".", 1)[0]


def hydra_overrides(experiment, groups=STAGE_GROUPS):
    """The preset and the overrides of ``groups`` of ``experiment``; outputs go to results/<experiment>/."""
    extra = [override for override in config["experiments"][experiment]
             if override_group(override) in groups or override_group(override) not in STAGE_GROUPS]
    return [f"experiment={experiment}", *extra, f"results_dir=results/{experiment}"]


def compose_experiment(experiment):
    """The config every stage of ``experiment`` composes (a bad override fails here, before any job)."""
    with initialize_config_dir(str(Path(pipeline.__file__).parent / "conf"), version_base="1.3"):
        return compose("config", overrides=hydra_overrides(experiment))


CONFIGS = {experiment: compose_experiment(experiment) for experiment in EXPERIMENTS}


def data_settings(cfg):
    """What a dataset's files depend on: the data config and the seed."""
    return OmegaConf.to_yaml({"data": cfg.data, "seed": cfg.seed}, resolve=True)


# dataset name -> the first experiment that uses it (its overrides make the dataset's files).
# Datasets live under data/ and are shared by every experiment that names them, so two
# experiments may share one only with identical data settings.
DATASETS = {}
for experiment, cfg in CONFIGS.items():
    name = cfg.data.name
    if cfg.data.raw_dir != f"data/raw/{name}" or cfg.data.processed_dir != f"data/processed/{name}":
        raise WorkflowError(
            f"experiment {experiment}: the workflow keeps dataset {name} in data/raw/{name} and "
            f"data/processed/{name}; drop the data.raw_dir/data.processed_dir overrides (link data/raw/{name} "
            "to files elsewhere instead)."
        )
    first = DATASETS.setdefault(name, experiment)
    if data_settings(CONFIGS[first]) != data_settings(cfg):
        raise WorkflowError(
            f"experiments {first} and {experiment} use dataset {name} with different data settings or seeds; "
            "give one of them its own data.name."
        )


def hydra_args(*groups):
    """A params function: the preset and the overrides of ``groups`` of one experiment, quoted for the shell."""
    return lambda wildcards: " ".join(shlex.quote(override) for override in hydra_overrides(wildcards.experiment, groups))


def dataset_hydra_args(wildcards):
    """The data overrides of the experiment that makes a dataset's files, quoted for the shell."""
    return " ".join(shlex.quote(override) for override in hydra_overrides(DATASETS[wildcards.dataset], ("data",)))


def dataset_settings(wildcards):
    """A dataset's settings, a parameter of the data rules so that changing them reruns exactly those."""
    return data_settings(CONFIGS[DATASETS[wildcards.dataset]])


def raw_files(wildcards):
    """The raw files a dataset's preprocessing reads: generated shards, or the download record."""
    data = CONFIGS[DATASETS[wildcards.dataset]].data
    if Source(data.source) == Source.pythia:
        return expand(
            "data/raw/{dataset}/{class_name}_{shard:03d}.root",
            dataset=wildcards.dataset, class_name=data.class_names, shard=range(data.generator.n_shards),
        )
    return [f"data/raw/{wildcards.dataset}/download.json"]


def train_settings(wildcards):
    """What a training run depends on, a parameter of the train rule so that changing it reruns
    training (a longer train.steps resumes from the last checkpoint; see pipeline.train)."""
    cfg = CONFIGS[wildcards.experiment]
    return OmegaConf.to_yaml({"data": cfg.data, "model": cfg.model, "train": cfg.train, "seed": cfg.seed}, resolve=True)


def training_data(wildcards):
    """The processed files a training run reads."""
    processed = CONFIGS[wildcards.experiment].data.processed_dir
    return [f"{processed}/train.h5", f"{processed}/val.h5", f"{processed}/normalisation.json"]



def sample_settings(wildcards):
    """What a sample file depends on besides the checkpoint: the sampler settings and the data."""
    cfg = CONFIGS[wildcards.experiment]
    return OmegaConf.to_yaml({"data": cfg.data, "sample": cfg.sample, "seed": cfg.seed}, resolve=True)


def evaluate_settings(wildcards):
    """The metric settings: changing them reruns the evaluation only."""
    cfg = CONFIGS[wildcards.experiment]
    return OmegaConf.to_yaml({"evaluate": cfg.evaluate, "seed": cfg.seed}, resolve=True)


def likelihood_settings(wildcards):
    cfg = CONFIGS[wildcards.experiment]
    return OmegaConf.to_yaml({"likelihood": cfg.likelihood, "seed": cfg.seed}, resolve=True)


def processed_file(name):
    """An input function: the experiment's processed file ``name`` (e.g. test.h5)."""
    return lambda wildcards: f"{CONFIGS[wildcards.experiment].data.processed_dir}/{name}"
