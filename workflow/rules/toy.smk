rule toy:
    """Train the experiment's model on toy square rings and score it: an end-to-end check."""
    output:
        metrics="results/{experiment}/toy/metrics.json",
        plot="results/{experiment}/toy/samples.png",
    params:
        hydra=hydra_args("model", "train", "sample"),
    log:
        "results/{experiment}/logs/toy.log",
    threads: 1
    resources:
        mem_mb=2000,
        runtime=30,
    shell:
        "python -m pipeline.toy {params.hydra} > {log:q} 2>&1"
