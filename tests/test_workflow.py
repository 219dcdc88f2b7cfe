"""The Snakemake workflow: it lints, plans, and runs the default experiment for real."""

import base64
import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import time
from pathlib import Path

import h5py
import mlflow
import numpy as np
import pytest
import yaml

from conftest import PROJECT_ROOT, TINY, assert_refused, copy_workflow, page_text, rendered_dom, run_stage, snakemake
from pipeline.sets import read_sets


def test_workflow_lints_clean():
    """Snakemake's linter finds nothing but the rules' missing conda environments: every job runs in
    the environment Snakemake runs in (the README says why `--use-conda` is not supported)."""
    result = snakemake("--lint")
    output = result.stdout + result.stderr
    lints = {line.strip() for line in output.splitlines() if line.startswith("    * ")}
    assert lints == {"* Specify a conda environment or container for each rule.:"}, output
    assert "Lints for snakefile" not in output, output


def test_dry_run_plans_the_default_target():
    result = snakemake("--cores", "2", "-n", "--forceall")
    assert result.returncode == 0, result.stderr
    assert all(rule in result.stdout for rule in ("generate", "preprocess", "train", "sample", "evaluate", "toy", "all"))


def test_every_experiment_preset_plans_its_whole_pipeline(tmp_path):
    """A dry run of the full DAG with every preset in pipeline/conf/experiment as an experiment."""
    presets = sorted(path.stem for path in (PROJECT_ROOT / "pipeline" / "conf" / "experiment").glob("*.yaml"))
    assert {"demo", "jetnet30_gluon", "jetnet30_top", "jetnet150_gluon", "jetnet150_top", "jetclass", "jetclass_full", "toptagging",
            "qg"} <= set(presets)
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump({"experiments": {name: [] for name in presets}}))
    result = snakemake("--cores", "2", "-n", "--forceall", "--configfile", str(config))
    assert result.returncode == 0, result.stdout + result.stderr
    stats = result.stdout.split("Job stats:")[1].split("total")[0]
    counts = {line.split()[0]: int(line.split()[1]) for line in stats.splitlines()[3:] if line.strip()}
    assert counts["train"] == counts["sample"] == counts["evaluate"] == len(presets)
    assert counts["download"] == len(presets) - 1  # every preset but demo downloads its own dataset
    assert counts["preprocess_shard"] == 125  # full JetClass: one job per shard of 10 files, side by side


def test_bad_workflow_config_is_refused_in_one_sentence(tmp_path):
    copy_workflow(tmp_path)
    for config, message in [
        ("experiments:\n  demo: 3\n", "config['experiments']['demo']: 3 is not of type 'array'"),
        ("experimnts:\n  demo: []\n", "('experimnts' was unexpected)"),
        ("experiments:\n  nosuch: []\n", "experiment nosuch uses the preset nosuch, which does not exist"),
        ("experiments:\n  demo: [model.d_modle=3]\n", "Could not override 'model.d_modle': Key 'd_modle' not in 'ModelConfig'"),
        ("experiments:\n  demo: [model=nosuch]\n", "Could not find 'model/nosuch' Available options in 'model': base large small"),
        ("experiments:\n  demo: ['train.steps=(5']\n", "'train.steps=(5' is not a Hydra override"),
    ]:
        (tmp_path / "workflow" / "config.yaml").write_text(config)
        assert_refused(snakemake("--cores", "1", "-n", cwd=tmp_path), message)


def test_a_shell_injection_through_a_name_runs_nothing(tmp_path):
    """Names become paths in shell commands: one that a shell would expand is refused, in the workflow
    config and in a stage run by hand, before any job or file."""
    copy_workflow(tmp_path)
    for name, message in [
        ("data.name='x$(touch PWNED)y'", "experiment demo: data.name='x$(touch PWNED)y' is not a safe name"),
        ("data.class_names=[g,'q;touch PWNED']", "data.class_names[1]='q;touch PWNED' is not a safe name"),
        ("name='../../outside'", "name='../../outside' is not a safe name"),
    ]:
        (tmp_path / "workflow" / "config.yaml").write_text(yaml.safe_dump({"experiments": {"demo": [*TINY, name]}}))
        assert_refused(snakemake("--cores", "1", cwd=tmp_path), message)
    (tmp_path / "workflow" / "config.yaml").write_text(yaml.safe_dump({"experiments": {"demo; touch PWNED": []}}))
    assert_refused(snakemake("--cores", "1", cwd=tmp_path), "'demo; touch PWNED' does not match")
    assert sorted(path.name for path in tmp_path.iterdir()) == [".snakemake", "Snakefile", "environment.yml", "workflow"]
    for name in ("data.name='x$(touch PWNED)y'", "name='../../outside'"):
        by_hand = run_stage("generate", name, "data.generator.jets_per_shard=2", cwd=tmp_path / "workflow")
        assert by_hand.returncode == 2 and by_hand.stderr.strip().splitlines()[-1] == f"generate: error: {name} is not a safe " \
            "name: it becomes folder and file names and shell arguments, so use letters, digits, '_' and '-' only, " \
            "starting with a letter or a digit.", by_hand.stderr
    assert not (tmp_path / "workflow" / "data").exists() and not (tmp_path / "outside").exists()
    assert not list(tmp_path.rglob("*PWNED*"))


def test_every_path_in_a_shell_command_is_quoted():
    """Paths and wildcards reach the shell only through Snakemake's quoting ({log:q}) or shlex.quote
    (the Hydra overrides): a name that slipped past validation still could not run a command."""
    rules = "".join(path.read_text() for path in (PROJECT_ROOT / "workflow" / "rules").glob("*.smk"))
    shell_commands = re.findall(r"shell:\s*((?:\"[^\"]*\"\s*)+)", rules)
    assert len(shell_commands) == rules.count("\n    shell:") == 9  # every rule but `all` runs a stage
    for command in shell_commands:
        assert not re.findall(r"\{(?:log|input|output|wildcards)[^}:]*\}", command), command
        assert "{log:q}" in command


@pytest.mark.slow
def test_end_to_end_run_tags_every_stage_with_one_execution(tmp_path, tmp_path_factory, request):
    """A real `snakemake --cores 2` in a copy of the workflow, with a tiny model; its dataset is
    preprocessed in two shards (one job each) that a third job joins."""
    config = copy_workflow(tmp_path, "data.preprocess_shards=2")
    result = snakemake("--cores", "2", cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    toy_metrics = json.loads((tmp_path / "results/demo/toy/metrics.json").read_text())
    assert (tmp_path / "results/demo/toy/samples.png").stat().st_size > 0
    assert yaml.safe_load((tmp_path / "results/demo/toy/config.yaml").read_text())["toy"]["steps"] == 20
    train = read_sets(tmp_path / "data/processed/pythia/train.h5")
    assert train["class_names"] == ["g", "q", "t"] and len(train["labels"]) == round(0.6 * 3 * 2 * 20)  # the pythia dataset: 60% train
    runs = mlflow.search_runs(experiment_names=["demo"])
    trained = json.loads((tmp_path / "results/demo/train/checkpoint.json").read_text())
    assert trained["step"] == 30 and (tmp_path / trained["latest"]).is_dir() and trained["best_val_nelbo_bpd"] > 0
    assert sorted(runs["tags.pipeline.stage"]) == ["evaluate"] + ["generate"] * 6 + ["preprocess"] * 3 + ["sample", "toy", "train"]
    generated = [f"generate {name}/{shard}" for name in ("g", "q", "t") for shard in (0, 1)]
    preprocessed = ["preprocess join", "preprocess shard 0/2", "preprocess shard 1/2"]
    assert sorted(runs["tags.mlflow.runName"]) == ["evaluate", *generated, *preprocessed, "sample", "toy", "train"]
    with h5py.File(tmp_path / "data/processed/pythia/train.h5") as file:
        assert file["particles"].is_virtual  # the two shards, joined
    assert_lineage(tmp_path, runs)
    toy_run = runs[runs["tags.pipeline.stage"] == "toy"].iloc[0]
    assert toy_metrics and toy_metrics == pytest.approx({name: toy_run[f"metrics.{name}"] for name in toy_metrics})  # file == run
    assert np.bincount(read_sets(tmp_path / "results/demo/sample/samples.h5")["labels"]).tolist() == [20, 20, 20]
    metrics = json.loads((tmp_path / "results/demo/evaluate/metrics.json").read_text())
    assert np.isfinite([metrics[f"{comparison}.all.{name}"] for comparison in ("sample", "truth") for name in ("w1m", "fpd", "cov")]).all()
    assert runs["tags.pipeline.execution"].nunique() == 1 and runs["tags.pipeline.execution"].iloc[0]
    rerun = snakemake("--cores", "2", cwd=tmp_path)
    assert rerun.returncode == 0 and "Nothing to be done" in rerun.stdout + rerun.stderr
    report = snakemake("--report", "report.html", cwd=tmp_path)
    assert report.returncode == 0, report.stderr
    assert all(f"Adding {name}" in report.stdout + report.stderr for name in ("metrics.tsv", "jet_mass.png", "jet_images.png"))
    assert (tmp_path / "report.html").stat().st_size > 100_000

    def planned_rules(*overrides):
        """The rules a dry run would run after changing the experiment's overrides."""
        changed = {"experiments": {"demo": [*config["experiments"]["demo"], *overrides]}}
        (tmp_path / "workflow" / "config.yaml").write_text(yaml.safe_dump(changed))
        plan = snakemake("--cores", "2", "-n", cwd=tmp_path)
        assert plan.returncode == 0, plan.stderr
        stats = (plan.stdout + plan.stderr).split("Job stats:")[1].split("total")[0]
        return {line.split()[0] for line in stats.splitlines()[3:] if line.strip()}

    assert planned_rules("train.steps=40") == {"train", "sample", "evaluate", "toy", "all"}
    assert planned_rules("sample.steps=5") == {"sample", "evaluate", "toy", "all"}
    assert planned_rules("evaluate.cov_mmd_batches=3") == {"evaluate", "all"}
    assert planned_rules("toy.steps=25") == {"toy", "all"}
    assert planned_rules("data.generator.jets_per_shard=21") >= {"generate", "preprocess", "train", "evaluate"}

    # The report as a person opens it, sent elsewhere (last: skips here, saying why, where no browser
    # can be installed): the landing page shows the experiment's metrics table, cell for cell, and
    # its plots per class and jet images, each the plot's own bytes inside the page.
    elsewhere = tmp_path_factory.mktemp("mailed") / "report.html"
    shutil.copy(tmp_path / "report.html", elsewhere)
    chromium = request.getfixturevalue("chromium")
    landing = page_text(chromium, elsewhere.as_uri())
    header, *rows = [line.split("\t") for line in (tmp_path / "results/demo/evaluate/metrics.tsv").read_text().splitlines()]
    assert " ".join(header) in landing and len(rows) == 8, landing[:3000]
    assert all(" ".join(row) in landing for row in rows), landing[:3000]
    images = dict(re.findall(r'<img alt="([^"]+)" src="data:image/png;base64,([^"]+)"', rendered_dom(chromium, elsewhere.as_uri())))
    plots = tmp_path / "results/demo/evaluate/plots"
    assert sorted(images) == sorted(path.name for path in plots.glob("*.png") if "_by_class" in path.name or path.name == "jet_images.png")
    assert all(base64.b64decode(data) == (plots / name).read_bytes() for name, data in images.items())


def assert_lineage(folder, runs):
    """Each run's MLflow datasets are the files it read and wrote, each named by its path, digested
    by its bytes and counting its jets; what one stage wrote is what the next one read."""
    files = {}  # (stage, context) -> {name: (digest, jets)}
    for run_id, stage in zip(runs["run_id"], runs["tags.pipeline.stage"]):
        for dataset_input in mlflow.get_run(run_id).inputs.dataset_inputs:
            dataset, tags = dataset_input.dataset, {tag.key: tag.value for tag in dataset_input.tags}
            path = folder / dataset.name
            assert dataset.digest == hashlib.sha256(path.read_bytes()).hexdigest()[:16], dataset.name
            jets = json.loads(dataset.profile)["jets"] if dataset.profile else None
            if path.suffix == ".h5":
                assert jets == len(read_sets(path, datasets=("labels",))["labels"]), dataset.name
            files.setdefault((stage, tags["mlflow.data.context"]), {})[dataset.name] = (dataset.digest, jets)
    shards = {name: value for (stage, _), written in files.items() if stage == "generate" for name, value in written.items()}
    assert len(shards) == 6 and all(jets == 20 for _, jets in shards.values())
    # Two shard jobs read the raw files and wrote shards of every split; the join read those shards.
    read, written = files["preprocess", "read"], files["preprocess", "written"]
    assert {name: value for name, value in read.items() if name.startswith("data/raw/")} == shards
    preprocessed_shards = {f"data/processed/pythia/shards/{name}-0000{shard}-of-00002.{suffix}" for shard in (0, 1)
                           for name, suffix in (("train", "h5"), ("val", "h5"), ("test", "h5"), ("moments", "json"))}
    assert {name: value for name, value in read.items() if "/shards/" in name} == {name: written[name] for name in preprocessed_shards}
    processed = {f"data/processed/pythia/{name}" for name in ("train.h5", "val.h5", "test.h5", "normalisation.json")}
    assert set(written) == processed | preprocessed_shards
    assert files["train", "read"].items() <= files["preprocess", "written"].items() and len(files["train", "read"]) == 3
    assert files["sample", "read"]["results/demo/train/checkpoint.json"] == files["train", "written"]["results/demo/train/checkpoint.json"]
    assert files["sample", "written"] == {"results/demo/sample/samples.h5": files["evaluate", "read"]["results/demo/sample/samples.h5"]}
    assert files["evaluate", "read"]["data/processed/pythia/test.h5"] == files["preprocess", "written"]["data/processed/pythia/test.h5"]


def training_process(folder) -> int:
    """The process id of the training stage a workflow in ``folder`` runs."""
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            command = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
            if b"pipeline.train" in command and os.readlink(f"/proc/{pid}/cwd") == str(folder):
                return int(pid)
        except OSError:  # the process ended meanwhile
            continue
    raise AssertionError("no training process found")


@pytest.mark.slow
def test_a_workflow_killed_during_training_resumes_from_the_checkpoint(tmp_path, tiny_pythia_shards):
    """The training job is killed outright (SIGKILL: a lost node, the OOM killer); the same command
    again continues training from the last checkpoint, in the same MLflow run."""
    copy_workflow(tmp_path, "data.generator.n_shards=1", "train.steps=600", "train.checkpoint_every=25", "train.log_every=25",
                  "train.val_every=3000", raw_shards=tiny_pythia_shards)
    trained = "results/demo/train/checkpoint.json"  # the stages after training have nothing to show here
    process = subprocess.Popen(["snakemake", "--cores", "2", trained], cwd=tmp_path, env=os.environ,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    latest = tmp_path / "results/demo/train/checkpoints/latest"
    deadline = time.monotonic() + 300
    while not (latest.is_dir() and any(path.name.isdigit() for path in latest.iterdir())):
        assert process.poll() is None and time.monotonic() < deadline, "training never saved a checkpoint"
        time.sleep(0.2)
    os.kill(training_process(tmp_path), signal.SIGKILL)
    assert process.wait(timeout=300) != 0
    assert not (tmp_path / "results/demo/train/checkpoint.json").exists()
    saved = max(int(path.name) for path in latest.iterdir() if path.name.isdigit())

    result = snakemake("--cores", "2", trained, cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    log = (tmp_path / "results/demo/logs/train.log").read_text()
    first_logged = int(re.search(r"train: step (\d+)/", log).group(1))
    assert first_logged > saved >= 25  # continued from the checkpoint, not from step 0
    assert json.loads((tmp_path / trained).read_text())["step"] == 600
    train_runs = mlflow.search_runs(experiment_names=["demo"], filter_string="tags.`pipeline.stage` = 'train'")
    assert len(train_runs) == 1 and train_runs["status"].iloc[0] == "FINISHED"  # the same MLflow run, continued
