rule toy:
    """Train the experiment's model on toy square rings and score it: an end-to-end check."""
    output:
        metrics="results/{experiment}/toy/metrics.json",
        plot="results/{experiment}/toy/samples.png",
    params:
        hydra=hydra_args("model", "train", "sample", "toy"),
    log:
        "results/{experiment}/logs/toy.log",
    threads: 1
    # First: on few cores it then runs beside the one-core generate jobs, off the critical path,
    # instead of holding a core that preprocessing and training (two threads each) wait for.
    priority: 1
    resources:
        mem_mb=2000,
        runtime=30,
    shell:
        "python -m pipeline.toy {params.hydra} > {log:q} 2>&1"
