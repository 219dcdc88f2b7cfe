# Sampling, evaluation and likelihood rules: checkpoint -> generated jets -> metrics and plots
# (pipeline/sample.py, pipeline/evaluate.py, pipeline/likelihood.py).


rule sample:
    """Generate the experiment's jets from the training run's EMA parameters, on every device the job gets."""
    input:
        checkpoint="results/{experiment}/train/checkpoint.json",
        data=training_data,
        test=processed_file("test.h5"),
    output:
        "results/{experiment}/sample/samples.h5",
    params:
        hydra=hydra_args("data", "model", "train", "sample"),
        settings=sample_settings,
    log:
        "results/{experiment}/logs/sample.log",
    threads: 2
    resources:
        mem_mb=8000,
        runtime=240,
        gpu=0,  # profiles for GPU clusters set this (workflow/profiles/slurm)
    shell:
        "python -m pipeline.sample {params.hydra} > {log:q} 2>&1"


rule evaluate:
    """Score the generated jets against the test split (and the train split against it, the truth floor)."""
    input:
        samples="results/{experiment}/sample/samples.h5",
        test=processed_file("test.h5"),
        train=processed_file("train.h5"),
    output:
        metrics="results/{experiment}/evaluate/metrics.json",
        table="results/{experiment}/evaluate/metrics.md",
        report_table=report(
            "results/{experiment}/evaluate/metrics.tsv",
            caption="../report/metrics.rst",
            category="{experiment}",
            subcategory="metrics",
            labels={"experiment": "{experiment}", "figure": "metrics table"},
        ),
        plots=report(
            directory("results/{experiment}/evaluate/plots"),
            patterns=["{name}.png"],
            caption="../report/plots.rst",
            category="{experiment}",
            subcategory="plots",
            labels={"experiment": "{experiment}", "figure": "{name}"},
        ),
    params:
        hydra=hydra_args(*(group for group in STAGE_GROUPS if group != "toy")),
        settings=evaluate_settings,
    log:
        "results/{experiment}/logs/evaluate.log",
    threads: 2
    resources:
        mem_mb=8000,
        runtime=240,
    shell:
        "python -m pipeline.evaluate {params.hydra} evaluate.emd_jobs={threads} > {log:q} 2>&1"


rule likelihood:
    """Per-jet negative log-likelihood bound (nats) of the test split under the trained model; ROC/AUC for classes it was not trained on."""
    input:
        checkpoint="results/{experiment}/train/checkpoint.json",
        data=training_data,
        test=processed_file("test.h5"),
    output:
        "results/{experiment}/likelihood/metrics.json",
    params:
        hydra=hydra_args("data", "model", "train", "likelihood"),
        settings=likelihood_settings,
    log:
        "results/{experiment}/logs/likelihood.log",
    threads: 2
    resources:
        mem_mb=8000,
        runtime=240,
    shell:
        "python -m pipeline.likelihood {params.hydra} > {log:q} 2>&1"
