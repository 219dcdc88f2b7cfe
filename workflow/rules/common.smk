# Shared by all rules: the experiments to run, their Hydra configs, the datasets they need, and the
# id that ties together every MLflow run of one workflow execution (tag `pipeline.execution`).
import functools
import itertools
import os
import shlex
import subprocess
import sys
import uuid
from pathlib import Path

import jsonschema
import yaml
from hydra import compose, initialize_config_dir
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.errors import HydraException, OverrideParseException
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException
from snakemake.utils import validate

import pipeline
from pipeline.config import SAFE_NAME, SHARDS_FOLDER, Source, check_names, processed_shard_stem, pythia_shard_stem

CONFIG_SCHEMA = "workflow/schemas/config.schema.yaml"
CONFIG_FILES = ", ".join(str(path) for path in workflow.configfiles)


def refuse(message):
    """Stop before any job with one sentence on stderr and exit status 2: a mistake in the workflow
    config (or an experiment's overrides) that the user fixes there."""
    print(f"workflow config ({CONFIG_FILES}): error: {message}", file=sys.stderr)
    sys.exit(2)


def check_workflow_config():
    """Validate the config against the schema (filling in its defaults); a violation is refused
    with the schema's most relevant complaint and where in the config it is."""
    schema_path = Path(workflow.basedir) / CONFIG_SCHEMA
    with open(schema_path) as file:
        schema = yaml.safe_load(file)
    error = jsonschema.exceptions.best_match(jsonschema.Draft202012Validator(schema).iter_errors(config))
    if error is not None:
        where = "".join(f"[{part!r}]" if isinstance(part, str) else f"[{part}]" for part in error.absolute_path)
        refuse(f"config{where}: {error.message}; see {CONFIG_SCHEMA} for what each key takes.")
    validate(config, str(schema_path))


check_workflow_config()


# Every wildcard that stands for a name: a folder under results/ or data/, so never a path.
wildcard_constraints:
    experiment=SAFE_NAME,
    dataset=SAFE_NAME,


# The config groups a stage reads: each rule passes only the overrides of the groups its stage and
# the stages before it read (and those of no group, e.g. seed), so that changing an evaluate
# setting reruns evaluate, a train setting train and what follows it, and nothing upstream.
STAGE_GROUPS = ("data", "model", "train", "sample", "evaluate", "likelihood", "toy")


# Every override of the workflow config is read by Hydra's own parser, as the stages will read it.
OVERRIDES_PARSER = OverridesParser.create()


@functools.cache  # asked of every override by every job's params; Hydra's parser takes ~1 ms a call
def override_group(override):
    """The config group an override sets: ``train`` for ``train.steps=5``, ``model`` for ``model=small``
    or ``model@x=small``, ``seed`` for ``~seed``."""
    try:
        parsed = OVERRIDES_PARSER.parse_override(override)
    except HydraException as error:
        refuse(f"{override!r} is not a Hydra override ({' '.join(str(error).split())}); fix it in the workflow config.")
    return parsed.key_or_group.split(".", 1)[0]


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
        parsed = OVERRIDES_PARSER.parse_overrides(overrides)
    except OverrideParseException as error:
        refuse(f"sweep {sweep}: {error}")
    choices = []
    for override in parsed:
        if override.is_interval_sweep():
            refuse(f"sweep {sweep}: {override.input_line} is a continuous interval; list the values to run instead.")
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
                refuse(f"sweep {sweep} makes experiment {name}, which is already an experiment; rename one of them.")
            experiments[name] = with_preset(sweep, point)
    if not experiments:
        refuse("the workflow config names no experiment: add one under experiments (e.g. demo: []) or a sweep.")
    for key in ("distributed_training", "likelihood"):
        unknown = set(config[key]) - set(experiments)
        if unknown:
            refuse(f"{key} names {', '.join(sorted(unknown))}, not an experiment of the workflow config.")
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


def composition_failure(error):
    """What Hydra's composition error says, in one line: its first line (and the options it lists),
    then the first line of its cause (``Key 'd_modle' not in 'ModelConfig'``), without the search
    path and the hints."""
    head = str(error).split("Config search path")[0].split("\nSee https")[0].split("\nTo append")[0]
    parts = [" ".join(head.replace(":\n", ": ").split()).rstrip(".")]
    if error.__cause__ is not None:
        parts.append(str(error.__cause__).splitlines()[0].rstrip("."))
    return ": ".join(parts)


def compose_experiment(experiment):
    """The config every stage of ``experiment`` composes: a missing preset, a bad override or an
    unsafe name is refused here, before any job."""
    conf = Path(pipeline.__file__).parent / "conf"
    preset = EXPERIMENTS[experiment][0].split("=", 1)[1]
    if not (conf / "experiment" / f"{preset}.yaml").is_file():
        presets = ", ".join(sorted(path.stem for path in (conf / "experiment").glob("*.yaml")))
        refuse(f"experiment {experiment} uses the preset {preset}, which does not exist: name an existing "
               f"preset in its overrides (experiment=<preset>, one of {presets}).")
    try:
        with initialize_config_dir(str(conf), version_base="1.3"):
            cfg = compose("config", overrides=hydra_overrides(experiment))
        check_names(cfg)
    except (HydraException, OmegaConfBaseException, ValueError) as error:
        refuse(f"experiment {experiment}: {composition_failure(error)}; fix its overrides.")
    return cfg


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
        refuse(
            f"experiment {experiment}: the workflow keeps dataset {name} in data/raw/{name} and "
            f"data/processed/{name}; drop the data.raw_dir/data.processed_dir overrides (link data/raw/{name} "
            "to files elsewhere instead)."
        )
    first = DATASETS.setdefault(name, experiment)
    if data_settings(CONFIGS[first]) != data_settings(cfg):
        refuse(
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
        return [f"data/raw/{wildcards.dataset}/{pythia_shard_stem(name, shard)}.root"
                for name in data.class_names for shard in range(data.generator.n_shards)]
    return [f"data/raw/{wildcards.dataset}/download.json"]


def raw_files_of_shard(wildcards):
    """The raw files that preprocessing shard ``wildcards.shard`` reads (pipeline.preprocess.shard_groups:
    dealt round-robin); for downloaded datasets, the download record (the files are known once it exists)."""
    data = CONFIGS[DATASETS[wildcards.dataset]].data
    files = raw_files(wildcards)
    if Source(data.source) != Source.pythia:
        return files
    return files[int(wildcards.shard) :: data.preprocess_shards]


def preprocess_inputs(wildcards):
    """The inputs of preprocessing a dataset: its raw files, or with data.preprocess_shards > 1 the
    shards that it joins."""
    data = CONFIGS[DATASETS[wildcards.dataset]].data
    if data.preprocess_shards == 1:
        return raw_files(wildcards)
    folder = f"data/processed/{wildcards.dataset}/{SHARDS_FOLDER}"
    return [f"{folder}/{name}-{processed_shard_stem(shard, data.preprocess_shards)}.{suffix}"
            for shard in range(data.preprocess_shards)
            for name, suffix in (("train", "h5"), ("val", "h5"), ("test", "h5"), ("moments", "json"))]


def preprocess_join(wildcards):
    """The override that makes the preprocess rule join shards, where there are several."""
    return "data.preprocess_join=true" if CONFIGS[DATASETS[wildcards.dataset]].data.preprocess_shards > 1 else ""


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


def refuse_gpus_the_cluster_lacks():
    """Under the SLURM executor, before any job is submitted: jobs that ask for a GPU on a cluster
    whose nodes have none would each fail at sbatch ("Invalid generic resource (gres)
    specification"); stop instead, in one sentence saying how to run on CPU nodes. Where sinfo
    cannot tell, SLURM decides."""
    if workflow.executor_plugin is None or workflow.executor_plugin.name != "slurm":
        return
    asking = sorted({job.rule.name for job in workflow.dag.needrun_jobs()
                     if str(job.resources.get("gpu", 0)) not in ("0", "") or "gpu" in str(job.resources.get("gres", ""))})
    if not asking:
        return
    try:
        nodes = subprocess.run(["sinfo", "--noheader", "--format=%G"], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired):
        return
    if nodes.returncode != 0 or "gpu" in nodes.stdout:
        return
    print(f"slurm: error: {', '.join(asking)} ask for a GPU and no node of this cluster has one (sinfo lists no gpu "
          f"resource): run with --set-resources {' '.join(f'{rule}:gpu=0' for rule in asking)} to use CPU cores.",
          file=sys.stderr)
    sys.exit(2)
