# Shared by all rules: the experiments to run, their Hydra configs, the datasets they need, and the
# id that ties together every MLflow run of one workflow execution (tag `pipeline.execution`).
import itertools
import os
import shlex
import uuid
from pathlib import Path

from hydra import compose, initialize_config_dir
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.errors import OverrideParseException
from omegaconf import OmegaConf

import pipeline
from pipeline.config import Source


# The config groups a stage reads: each rule passes only the overrides of the groups its stage and
# the stages before it read (and those of no group, e.g. seed), so that changing an evaluate
# setting reruns evaluate, a train setting train and what follows it, and nothing upstream.
STAGE_GROUPS = ("data", "model", "train", "sample", "evaluate", "likelihood")


def override_group(override):
    """The config group an override sets: ``train`` for ``train.steps=5``, ``model`` for ``model=small``."""
    key = override.lstrip("+~").split("=", 1)[0]
    return key.split("@", 1)[0].split(".", 1)[0]


def with_preset(name, overrides):
    """``overrides`` with the preset first: the list's ``experiment=<preset>``, else the preset ``name``."""
    presets = [override for override in overrides if override_group(override) == "experiment"]
    others = [override for override in overrides if override_group(override) != "experiment"]
    return [presets[-1] if presets else f"experiment={name}", *others]


def sweep_experiments(sweep, overrides):
    """The experiments of one sweep: ``{<sweep>_<i>: overrides}``, one per combination of the swept
    values (Hydra's multirun syntax: ``a=1,2``, ``range(...)``, ``choice(...)``) in the order Hydra's
    multirun would run them, each logging to the MLflow experiment ``<sweep>`` unless it sets ``name``."""
    try:
        parsed = OverridesParser.create().parse_overrides(overrides)
    except OverrideParseException as error:
        raise WorkflowError(f"sweep {sweep}: {error}") from None
    choices = []
    for override in parsed:
        if override.is_interval_sweep():
            raise WorkflowError(f"sweep {sweep}: {override.input_line} is a continuous interval; list the values to run instead.")
        if override.is_sweep_override():
            choices.append([f"{override.get_key_element()}={value}" for value in override.sweep_string_iterator()])
        else:
            choices.append([override.input_line])
    name = [] if any(override.get_key_element() == "name" for override in parsed) else [f"name={sweep}"]
    return {f"{sweep}_{index}": [*name, *point] for index, point in enumerate(itertools.product(*choices))}


def workflow_experiments():
    """Every experiment to run, ``{name: [experiment=<preset>, overrides...]}``: those of
    ``experiments`` and the points of every sweep."""
    experiments = {name: with_preset(name, overrides) for name, overrides in config["experiments"].items()}
    for sweep, overrides in config["sweeps"].items():
        for name, point in sweep_experiments(sweep, overrides).items():
            if name in experiments:
                raise WorkflowError(f"sweep {sweep} makes experiment {name}, which is already an experiment; rename one of them.")
            experiments[name] = with_preset(sweep, point)
    if not experiments:
        raise WorkflowError("the workflow config names no experiment: add one under experiments (e.g. demo: []) or a sweep.")
    for key in ("distributed_training", "likelihood"):
        unknown = set(config[key]) - set(experiments)
        if unknown:
            raise WorkflowError(f"{key} names {', '.join(sorted(unknown))}, not an experiment of the workflow config.")
    return experiments


EXPERIMENTS = workflow_experiments()
os.environ.setdefault("PIPELINE_EXECUTION_ID", uuid.uuid4().hex)


envvars:
    "PIPELINE_EXECUTION_ID",


def hydra_overrides(experiment, groups=STAGE_GROUPS):
    """The preset and the overrides of ``groups`` of ``experiment``; outputs go to results/<experiment>/."""
    preset, *others = EXPERIMENTS[experiment]
    extra = [override for override in others
             if override_group(override) in groups or override_group(override) not in STAGE_GROUPS]
    return [preset, *extra, f"results_dir=results/{experiment}"]


def compose_experiment(experiment):
    """The config every stage of ``experiment`` composes (a bad override fails here, before any job)."""
    with initialize_config_dir(str(Path(pipeline.__file__).parent / "conf"), version_base="1.3"):
        return compose("config", overrides=hydra_overrides(experiment))


CONFIGS = {experiment: compose_experiment(experiment) for experiment in EXPERIMENTS}


def training_processes(wildcards):
    """SLURM nodes and training processes of an experiment (workflow config distributed_training)."""
    layout = config["distributed_training"].get(wildcards.experiment, {})
    nodes = layout.get("nodes", 1)
    return nodes, nodes * layout.get("tasks_per_node", 1)


def training_launcher(wildcards, threads):
    """The command that starts training: srun with one task per process when an experiment trains
    on several (they join with jax.distributed; see pipeline.train), else nothing."""
    nodes, tasks = training_processes(wildcards)
    if tasks == 1:
        return ""
    return f"srun --nodes={nodes} --ntasks={tasks} --ntasks-per-node={tasks // nodes} --cpus-per-task={threads} --kill-on-bad-exit=1 "


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
