"""The workflow submitted to a real SLURM cluster with workflow/profiles/slurm: a single-node cluster
on this machine (tests/slurm_cluster.sh) runs the tiny pipeline, one SLURM job per stage."""

import json
import os
import re
import shutil
import subprocess
from collections import Counter
from pathlib import Path

import mlflow
import pytest
import yaml

from conftest import copy_workflow

CLUSTER = Path(__file__).with_name("slurm_cluster.sh")


@pytest.fixture(scope="module")
def slurm_cluster():
    """A running single-node SLURM cluster, stopped after the module's tests."""
    if os.geteuid() != 0:
        pytest.skip("starting a SLURM cluster needs root")
    if not shutil.which("slurmctld") and not shutil.which("apt-get"):
        pytest.skip("SLURM is not installed and there is no apt-get to install it")
    start = subprocess.run(["bash", CLUSTER, "start"], capture_output=True, text=True, timeout=600)
    if start.returncode != 0 and not shutil.which("slurmctld"):
        pytest.skip(f"could not install SLURM with apt-get: {start.stderr.strip()[-500:]}")
    assert start.returncode == 0, start.stderr
    yield
    subprocess.run(["bash", CLUSTER, "stop"], check=True, timeout=120)


def slurm_jobs(run_id) -> list[dict]:
    """The SLURM jobs of one Snakemake run (the plugin names every job after the run's id)."""
    fields = ("id", "state", "comment", "tres_per_job", "tasks")
    listing = subprocess.run(
        ["squeue", "--states=all", "--noheader", f"--name={run_id}",
         "--Format=JobID:|,State:|,Comment:|,tres-per-job:|,NumTasks:|"],
        capture_output=True, text=True, check=True,
    ).stdout
    return [dict(zip(fields, line.split("|"))) for line in listing.splitlines()]


@pytest.mark.slow
def test_workflow_runs_on_slurm_with_the_profile(slurm_cluster, tmp_path, tiny_pythia_shards):
    # The raw files are there already (one shard per class), so the jobs start at preprocessing:
    # generation runs like any other stage, and the workflow test runs it. Training runs as two
    # processes of one job (two SLURM tasks under srun, joined by jax.distributed), as it would on
    # two nodes; one CPU each, so that both fit on this machine's two.
    config = copy_workflow(tmp_path, "data.generator.n_shards=1", raw_shards=tiny_pythia_shards)
    config["distributed_training"] = {"demo": {"nodes": 1, "tasks_per_node": 2}}
    (tmp_path / "workflow" / "config.yaml").write_text(yaml.safe_dump(config))
    result = subprocess.run(
        # The profile as users run it; only the status checks come sooner (jobs here take seconds).
        # Up to the samples: evaluate and toy would add two more jobs of the same kind. Sampling asks
        # for no GPU, as the README says to run on a cluster without any; --set-resources on the
        # command line replaces the profile's whole list, so train's GPU is given again. (That the
        # profile itself asks a GPU for both shows in the next test, whose refusal names them.)
        ["snakemake", "results/demo/sample/samples.h5", "--profile", "workflow/profiles/slurm",
         "--slurm-init-seconds-before-status-checks=1", "--seconds-between-status-checks=1", "--set-threads", "train=1",
         "--set-resources", "train:gpu=1", "sample:gpu=0"],
        cwd=tmp_path, capture_output=True, text=True, timeout=900, env=os.environ,
    )
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    assert (tmp_path / "results/demo/sample/samples.h5").is_file()

    # Every stage ran as its own SLURM job; train asked for the profile's GPU, sample for none.
    jobs = slurm_jobs(re.search(r"SLURM run ID: (\S+)", output).group(1))
    assert all(job["state"] == "COMPLETED" for job in jobs), jobs
    rules = Counter(re.match(r"rule_([a-z]+)", job["comment"]).group(1) for job in jobs)
    assert rules == {"preprocess": 1, "train": 1, "sample": 1}
    gpu_rules = {job["comment"] for job in jobs if "gpu" in job["tres_per_job"]}
    assert gpu_rules == {"rule_train_wildcards_demo"}, jobs
    assert "gpu:1" in next(job["tres_per_job"] for job in jobs if job["comment"] == "rule_train_wildcards_demo")
    tasks = {job["comment"]: job["tasks"] for job in jobs}
    assert tasks["rule_train_wildcards_demo"] == "2" and tasks["rule_sample_wildcards_demo"] == "1"
    trained = json.loads((tmp_path / "results/demo/train/checkpoint.json").read_text())
    assert trained["processes"] == 2 and trained["step"] == 30
    assert "process 1 of 2" in (tmp_path / "results/demo/logs/train.log").read_text()

    # The jobs saw the submitting shell's environment: they logged to the test's tracking store, all
    # with the one execution id that the Snakemake process made.
    runs = mlflow.search_runs(experiment_names=["demo"])
    assert sorted(runs["tags.pipeline.stage"]) == ["preprocess", "sample", "train"]
    assert runs["tags.pipeline.execution"].nunique() == 1 and runs["tags.pipeline.execution"].iloc[0]


@pytest.mark.slow
def test_gpus_asked_of_a_cluster_without_any_stop_the_workflow_before_it_submits(slurm_cluster, tmp_path):
    """The profile's GPU request on a cluster whose nodes have none (this one, as a stand-in sinfo
    shows it: no gpu resource): one sentence saying how to run on CPU cores, nothing submitted."""
    copy_workflow(tmp_path, "data.generator.n_shards=1")
    stand_in = tmp_path / "bin"
    stand_in.mkdir()
    (stand_in / "sinfo").write_text(
        "#!/bin/sh\n"
        'for arg in "$@"; do [ "$arg" = "--format=%G" ] && { echo "(null)"; exit 0; }; done\n'
        f'exec {shutil.which("sinfo")} "$@"\n'
    )
    (stand_in / "sinfo").chmod(0o755)
    result = subprocess.run(
        ["snakemake", "results/demo/sample/samples.h5", "--profile", "workflow/profiles/slurm"],
        cwd=tmp_path, capture_output=True, text=True, timeout=600,
        env={**os.environ, "PATH": f"{stand_in}{os.pathsep}{os.environ['PATH']}"},
    )
    output = result.stdout + result.stderr
    assert result.returncode == 2, output
    assert ("slurm: error: sample, train ask for a GPU and no node of this cluster has one (sinfo lists no gpu resource): "
            "run with --set-resources sample:gpu=0 train:gpu=0 to use CPU cores.") in result.stderr, output
    assert "Traceback" not in output and not (tmp_path / "data" / "raw").exists()
