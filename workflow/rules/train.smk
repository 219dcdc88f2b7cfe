# Training rule: processed sets -> checkpoints of the experiment's model (pipeline/train.py).


rule train:
    """Train the experiment's VDM on every device the job gets; rerunning resumes from the latest
    checkpoint (results/{experiment}/train/checkpoints/), so a preempted job loses little. An
    experiment in the workflow config's distributed_training runs as several SLURM tasks, on
    several nodes, started by srun."""
    input:
        training_data,
    output:
        "results/{experiment}/train/checkpoint.json",
    params:
        hydra=hydra_args("data", "model", "train"),
        settings=train_settings,
        launcher=training_launcher,
    log:
        "results/{experiment}/logs/train.log",
    threads: 2
    resources:
        mem_mb=8000,
        runtime=1440,
        gpu=0,  # profiles for GPU clusters set this (workflow/profiles/slurm)
        # For snakemake-executor-plugin-slurm: `sbatch --nodes --ntasks` as distributed_training
        # says, and a job with several tasks is started by the launcher's srun (the plugin's "mpi"
        # jobs), not by the plugin's own single-task srun.
        nodes=lambda wildcards: training_processes(wildcards)[0],
        tasks=lambda wildcards: training_processes(wildcards)[1],
        mpi=lambda wildcards: "srun" if training_processes(wildcards)[1] > 1 else "",
        tasks_per_gpu=0,  # no --ntasks-per-gpu: the tasks above are the processes
    shell:
        "{params.launcher}python -m pipeline.train {params.hydra} > {log:q} 2>&1"
