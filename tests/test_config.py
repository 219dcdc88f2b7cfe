"""Hydra configuration: presets, overrides, sweeps, saved configs, and refusal of bad input."""

import mlflow
import yaml
from mlflow.tracking import MlflowClient
from omegaconf import OmegaConf

from conftest import TINY, compose_config, run_stage


def composed(tmp_path, *overrides):
    """The job config a stage would run with, composed in-process as the stage composes it."""
    return OmegaConf.to_container(compose_config(f"results_dir={tmp_path}", *overrides), resolve=True, enum_to_str=True)


def test_cfg_job_prints_the_resolved_config_and_runs_nothing(tmp_path):
    result = run_stage("toy", f"results_dir={tmp_path}", "train.steps=200", "--cfg", "job", "--resolve")
    assert result.returncode == 0, result.stderr
    assert yaml.safe_load(result.stdout) == composed(tmp_path, "train.steps=200")
    assert not list(tmp_path.iterdir())


def test_default_experiment_is_the_demo_preset(tmp_path):
    cfg = composed(tmp_path)
    assert cfg["name"] == "demo"
    assert cfg["model"]["d_model"] == 64  # model=small, chosen by the preset
    assert cfg["data"]["name"] == "pythia" and cfg["data"]["class_names"] == ["g", "q", "t"]


def test_overrides_and_group_choices_apply(tmp_path):
    cfg = composed(tmp_path, "model=large", "train.steps=200", "data=jetnet150", "model.schedule=fixed_linear")
    assert cfg["model"]["d_model"] == 256 and cfg["model"]["n_inducing"] == 32
    assert cfg["model"]["schedule"] == "fixed_linear"
    assert cfg["train"]["steps"] == 200
    assert cfg["data"]["n_max"] == 150 and cfg["data"]["processed_dir"] == "data/processed/jetnet150"


def assert_refused(result, *words, results_dir):
    assert result.returncode != 0
    for word in words:
        assert word in result.stderr, result.stderr
    assert "Traceback" not in result.stderr
    assert not results_dir.exists(), "a refused config must not start any work"


def test_wrong_type_is_refused_naming_the_key(tmp_path):
    results = tmp_path / "results"
    result = run_stage("toy", f"results_dir={results}", "model.d_model=abc")
    assert_refused(result, "model.d_model", "abc", results_dir=results)


def test_misspelt_key_is_refused_naming_the_key(tmp_path):
    results = tmp_path / "results"
    result = run_stage("toy", f"results_dir={results}", "train.stpes=10")
    assert_refused(result, "stpes", results_dir=results)


def test_unknown_choice_is_refused_listing_the_choices(tmp_path):
    results = tmp_path / "results"
    result = run_stage("toy", f"results_dir={results}", "sample.sampler=euler")
    assert_refused(result, "sample.sampler", "ddim", "heun", results_dir=results)


def test_churn_with_the_ancestral_sampler_is_refused_in_one_sentence_before_training(tmp_path):
    """The toy stage samples with the ``sample`` settings too, so it refuses what the sampling stage does."""
    result = run_stage("toy", f"results_dir={tmp_path}", *TINY, "sample.sampler=ancestral", "sample.churn=0.3")
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
    assert result.stderr.strip().splitlines()[-1].startswith(
        "toy: error: sample.churn=0.3 with sample.sampler=ancestral: churn is a fraction >= 0 for the ddim and heun samplers")
    assert not list(tmp_path.rglob("metrics.json"))


def test_multirun_sweeps_save_each_resolved_config_and_log_each_run(tmp_path):
    result = run_stage("toy", "--multirun", f"results_dir={tmp_path}", *TINY, "model.schedule=fixed_linear,learned_linear")
    assert result.returncode == 0, result.stderr
    saved = sorted((tmp_path / "multirun").glob("*/toy/*/config.yaml"))
    assert [yaml.safe_load(p.read_text())["model"]["schedule"] for p in saved] == ["fixed_linear", "learned_linear"]
    for path in saved:
        assert (path.parent / "metrics.json").exists()
    runs = MlflowClient().search_runs([mlflow.get_experiment_by_name("demo").experiment_id])
    assert sorted(run.data.params["model.schedule"] for run in runs) == ["fixed_linear", "learned_linear"]
