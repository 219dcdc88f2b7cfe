"""Sweeps in the workflow config: each combination becomes an experiment that plans, runs and is
compared in MLflow like any other; bad sweeps are refused before any job."""

import json
import os
import re

import mlflow
import numpy as np
import pytest
import yaml

from conftest import TINY, TINY_DATA, assert_refused, copy_workflow, mlflow_ui, page_text, run_stage, snakemake
from pipeline.sets import read_sets


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


@pytest.mark.slow
def test_a_sweep_runs_one_stage_or_all_and_its_points_compare_side_by_side_in_mlflow(tmp_path, request, tiny_pythia_shards):
    """Two learning rates as a sweep. A target file runs only what it needs; a stage run by hand
    writes the file the workflow writes; then both points are evaluated, and they share one
    MLflow experiment in which each evaluate run carries the train params beside the metrics, as
    the MLflow UI shows them in a real browser. (The raw files are there already: the sweep starts
    at preprocessing.)"""
    copy_workflow(tmp_path, raw_shards=tiny_pythia_shards)
    point = ["experiment=demo", *TINY, *TINY_DATA, "data.generator.n_shards=1", "train.learning_rate=1e-3,3e-4"]
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
    assert sorted(names) == ["evaluate lr_0", "evaluate lr_1", "preprocess", "sample lr_0", "sample lr_0", "sample lr_1",
                             "train lr_0", "train lr_1"]  # sample lr_0 by hand, then by the workflow
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
