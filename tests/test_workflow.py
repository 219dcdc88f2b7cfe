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

from conftest import PROJECT_ROOT, TINY, copy_workflow, mlflow_ui, page_text, rendered_dom, run_stage
from pipeline.sets import read_sets


def snakemake(*args, cwd=PROJECT_ROOT):
    return subprocess.run(["snakemake", *args], cwd=cwd, capture_output=True, text=True, timeout=600, env=os.environ)


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


def planned_commands(folder, config) -> dict[str, list[str]]:
    """Rule name -> the shell commands a dry run of the workflow in ``folder`` with ``config`` would run."""
    (folder / "workflow" / "config.yaml").write_text(yaml.safe_dump(config))
    plan = snakemake("--cores", "2", "-n", "-p", "--forceall", cwd=folder)
    assert plan.returncode == 0, plan.stdout + plan.stderr
    commands = {}
    for rule, command in re.findall(r"^rule (\w+):.*?\nShell command: (.*?)$", plan.stdout, re.S | re.M):
        commands.setdefault(rule, []).append(command)
    return commands


def test_a_sweep_becomes_one_experiment_per_combination_and_distributed_training_uses_srun(tmp_path):
    copy_workflow(tmp_path)
    commands = planned_commands(tmp_path, {
        "experiments": {"demo": [], "demo_wide": ["experiment=demo", "model.d_model=32"]},
        "sweeps": {"lr": ["experiment=demo", "train.learning_rate=1e-3,3e-4", "model.n_layers=range(1,3)"]},
        "distributed_training": {"demo_wide": {"nodes": 2, "tasks_per_node": 4}},
        "likelihood": ["lr_3"],
    })
    assert commands["likelihood"] == ["python -m pipeline.likelihood experiment=demo name=lr train.learning_rate=0.0003 "
                                      "model.n_layers=2 results_dir=results/lr_3 > results/lr_3/logs/likelihood.log 2>&1"]
    train = sorted(commands["train"])
    assert len(train) == 6 and len(commands["evaluate"]) == 6 and len(commands["preprocess"]) == 1  # one shared dataset
    points = [(0.001, 1), (0.001, 2), (0.0003, 1), (0.0003, 2)]  # Hydra's multirun order
    for index, (learning_rate, layers) in enumerate(points):
        assert f"python -m pipeline.train experiment=demo name=lr train.learning_rate={learning_rate} model.n_layers={layers} " \
               f"results_dir=results/lr_{index} > results/lr_{index}/logs/train.log" in " ".join(train)
    assert "python -m pipeline.train experiment=demo results_dir=results/demo >" in " ".join(train)
    [wide] = [command for command in train if "results/demo_wide" in command]
    assert wide.startswith("srun --nodes=2 --ntasks=8 --ntasks-per-node=4 --cpus-per-task=2 --kill-on-bad-exit=1 python -m pipeline.train "
                           "experiment=demo model.d_model=32 results_dir=results/demo_wide")
    assert not any(command.startswith("srun") for rule in ("sample", "evaluate") for command in commands[rule])


def test_bad_sweeps_and_distributed_training_are_refused(tmp_path):
    copy_workflow(tmp_path)
    for config, message in [
        ({"experiments": {}}, "names no experiment"),
        ({"experiments": {}, "sweeps": {"lr": ["experiment=demo", "train.learning_rate=interval(0.1,0.2)"]}}, "continuous interval"),
        ({"experiments": {"lr_0": []}, "sweeps": {"lr": ["experiment=demo", "seed=1,2"]}}, "already an experiment"),
        ({"experiments": {"demo": []}, "distributed_training": {"demo_wide": {"nodes": 2}}}, "not an experiment"),
        ({"experiments": {"demo": []}, "likelihood": ["jetnet30"]}, "likelihood names jetnet30"),
        ({"experiments": {"demo": []}, "distributed_training": {"demo": {"nodes": 0}}},
         "config['distributed_training']['demo']['nodes']: 0 is less than the minimum of 1"),
    ]:
        (tmp_path / "workflow" / "config.yaml").write_text(yaml.safe_dump(config))
        result = snakemake("--cores", "1", "-n", cwd=tmp_path)
        assert_refused(result, message)


def assert_refused(result, message):
    """The workflow stopped before any job with one sentence holding ``message``, and exit status 2."""
    output = (result.stdout + result.stderr).strip()
    assert result.returncode == 2 and len(output.splitlines()) == 1, output
    assert output.startswith("workflow config (") and message in output, output


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
        assert by_hand.returncode == 2 and by_hand.stderr.strip().splitlines()[-1] == f"error: {name} is not a safe " \
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


@pytest.mark.slow
def test_a_sweep_runs_one_stage_or_all_and_its_points_compare_side_by_side_in_mlflow(tmp_path, request):
    """Two learning rates as a sweep. A target file runs only what it needs; a stage run by hand
    writes the file the workflow writes; then both points are evaluated, and they share one
    MLflow experiment in which each evaluate run carries the train params beside the metrics, as
    the MLflow UI shows them in a real browser."""
    copy_workflow(tmp_path)
    point = ["experiment=demo", *TINY, "data.generator.jets_per_shard=20", "data.generator.batch_events=40",
             "data.generator.n_shards=1", "train.learning_rate=1e-3,3e-4"]
    (tmp_path / "workflow" / "config.yaml").write_text(yaml.safe_dump({"experiments": {}, "sweeps": {"lr": point}}))
    result = snakemake("--cores", "2", "results/lr_0/train/checkpoint.json", cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    assert (tmp_path / "results/lr_0/train/checkpoint.json").is_file()
    assert not (tmp_path / "results/lr_0/sample").exists() and not (tmp_path / "results/lr_1").exists()

    # The sweep's first point by hand, as the workflow would run it: preset, MLflow experiment, values.
    by_hand = run_stage("sample", "name=lr", *point[:-1], "train.learning_rate=0.001", "results_dir=results/lr_0", cwd=tmp_path)
    assert by_hand.returncode == 0, by_hand.stderr
    samples = tmp_path / "results/lr_0/sample/samples.h5"
    written_by_hand = read_sets(samples)
    evaluations = [f"results/{name}/evaluate/metrics.json" for name in ("lr_0", "lr_1")]  # `all` adds the toy check
    # The targets before --forcerun, which takes every name after it as a rule to force.
    result = snakemake("--cores", "2", *evaluations, "--forcerun", "sample", cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    assert not (tmp_path / "results/lr_0/toy").exists()  # only what the targets need
    written_by_workflow = read_sets(samples)
    for key in ("particles", "mask", "labels", "jets"):
        np.testing.assert_array_equal(written_by_workflow[key], written_by_hand[key])

    for name in ("lr_0", "lr_1"):
        assert "sample.all.w1m" in json.loads((tmp_path / f"results/{name}/evaluate/metrics.json").read_text())
    evaluations = mlflow.search_runs(experiment_names=["lr"], filter_string="tags.`pipeline.stage` = 'evaluate'")
    compared = evaluations.set_index("tags.mlflow.runName")[["run_id", "params.train.learning_rate", "metrics.sample.all.w1m"]]
    assert sorted(compared.index) == ["evaluate lr_0", "evaluate lr_1"]
    assert compared.loc["evaluate lr_0", "params.train.learning_rate"] == "0.001"
    assert compared.loc["evaluate lr_1", "params.train.learning_rate"] == "0.0003"
    assert np.isfinite(compared["metrics.sample.all.w1m"]).all()
    trainings = mlflow.search_runs(experiment_names=["lr"], filter_string="tags.`pipeline.stage` = 'train'")
    assert sorted(trainings["tags.mlflow.runName"]) == ["train lr_0", "train lr_1"]

    # The same runs as a person sees them: `mlflow ui` on the store, in headless Chromium. The
    # experiment opens on its runs table, which names every stage run; comparing the two evaluate
    # runs shows their learning rates and their metrics.
    chromium = request.getfixturevalue("chromium")  # skips here, saying why, where there is none
    experiment = mlflow.get_experiment_by_name("lr")
    names = mlflow.search_runs(experiment_names=["lr"])["tags.mlflow.runName"].tolist()
    assert {"generate g/0", "generate q/0", "generate t/0", "preprocess", "train lr_0", "train lr_1",
            "sample lr_0", "sample lr_1", "evaluate lr_0", "evaluate lr_1"} <= set(names)
    with mlflow_ui(os.environ["MLFLOW_TRACKING_URI"]) as url:
        table = page_text(chromium, f"{url}/#/experiments/{experiment.experiment_id}?workflowType=machine_learning")
        evaluate_runs = [compared.loc[f"evaluate lr_{point}", "run_id"] for point in (0, 1)]
        compare = page_text(chromium, f"{url}/#/compare-runs?runs={json.dumps(evaluate_runs)}"
                                      f"&experiments={json.dumps([experiment.experiment_id])}")
    # Each row: its chart-visibility and pin buttons, its colour, its name, when it was created.
    listed = re.findall(r"(?:Hide|Unhide) run Pin run #[0-9a-f]{6} (.+?) (?:\d+|a) (?:seconds?|minutes?) ago", table)
    assert sorted(listed) == sorted(names), table[:3000]
    # The Dataset column: what each run read and wrote, with digests.
    assert re.search(r"data/processed/pythia/train\.h5 \([0-9a-f]{16}\) read", table), table[:3000]
    assert "Comparing 2 Runs" in compare and "Run Name: evaluate lr_0 evaluate lr_1" in compare, compare[:3000]
    assert "train.learning_rate 0.001 0.0003" in compare, compare[:3000]
    # The metrics table shows a window of metric names, then their values run by run.
    shown_metrics = re.search(r"Metrics Show diff only ((?:\S+ )+?)((?:-?[\d.]+(?:e[+-]\d+)? )+)Artifacts", compare)
    assert shown_metrics, compare[:3000]
    metric_names, values = shown_metrics.group(1).split(), [float(value) for value in shown_metrics.group(2).split()]
    assert len(metric_names) >= 5 and len(values) == 2 * len(metric_names), shown_metrics.group(0)
    runs = {run_id: mlflow.get_run(run_id).data.metrics for run_id in evaluate_runs}
    for index, name in enumerate(metric_names):  # as the UI rounds them: 5 significant digits, at most 3 decimals
        logged = [runs[run_id][name] for run_id in evaluate_runs]
        assert values[2 * index : 2 * index + 2] == pytest.approx(logged, rel=5e-5, abs=6e-4), name


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
def test_a_workflow_killed_during_training_resumes_from_the_checkpoint(tmp_path):
    """The training job is killed outright (SIGKILL: a lost node, the OOM killer); the same command
    again continues training from the last checkpoint, in the same MLflow run."""
    copy_workflow(tmp_path, "data.generator.n_shards=1", "train.steps=600", "train.checkpoint_every=25", "train.log_every=25", "train.val_every=3000")
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
