# Training rule: processed sets -> checkpoints of the experiment's model (pipeline/train.py).


rule train:
    """Train the experiment's VDM on every device the job gets; rerunning resumes from the latest
    checkpoint (results/{experiment}/train/checkpoints/), so a preempted job loses little."""
    input:
        training_data,
    output:
        "results/{experiment}/train/checkpoint.json",
    params:
        hydra=hydra_args("data", "model", "train"),
        settings=train_settings,
    log:
        "results/{experiment}/logs/train.log",
    threads: 2
    resources:
        mem_mb=8000,
        runtime=1440,
        gpu=0,  # profiles for GPU clusters set this (workflow/profiles/slurm)
    conda:
        "../../environment.yml"
    shell:
        "python -m pipeline.train {params.hydra} > {log} 2>&1"
