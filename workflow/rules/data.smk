# Data rules: raw files (generated offline or downloaded) -> padded sets. Datasets live under data/
# and are made once for every experiment that uses them (see DATASETS in common.smk).


rule generate:
    """Generate one shard of one jet class with Pythia 8 + FastJet (no internet needed)."""
    output:  # pipeline.config.pythia_shard_stem's name: <class>_<3-digit shard>.root
        "data/raw/{dataset}/{class_name}_{shard}.root",
    wildcard_constraints:
        class_name=r"[a-z]+",
        shard=r"\d{3}",
    params:
        hydra=dataset_hydra_args,
        settings=dataset_settings,
        shard=lambda wildcards: int(wildcards.shard),
    log:
        "data/raw/{dataset}/logs/generate_{class_name}_{shard}.log",
    threads: 1
    resources:
        mem_mb=2000,
        runtime=120,
    shell:
        "python -m pipeline.generate {params.hydra} data.generator.class_name={wildcards.class_name:q}"
        " data.generator.shard={params.shard} > {log:q} 2>&1"


rule download:
    """Download a public dataset's raw files (and verify their checksums). A local rule (see the
    Snakefile). Not marked `cache:`: Snakemake's output cache keeps declared outputs only, and the raw
    files are listed in download.json, not declared; pooch already skips files that are present
    and match their checksum, so a rerun downloads nothing."""
    output:
        "data/raw/{dataset}/download.json",
    params:
        hydra=dataset_hydra_args,
        settings=dataset_settings,
    log:
        "data/raw/{dataset}/logs/download.log",
    resources:
        mem_mb=1000,
        runtime=600,
    shell:
        "python -m pipeline.download {params.hydra} > {log:q} 2>&1"


rule preprocess_shard:
    """Preprocess one group of a dataset's raw files into its shard of every split (only with
    data.preprocess_shards > 1: a cluster preprocesses the groups in parallel)."""
    input:
        raw_files_of_shard,
    output:  # pipeline.config.processed_shard_stem's name: 00003-of-00010
        train="data/processed/{dataset}/shards/train-{shard}-of-{n_shards}.h5",
        val="data/processed/{dataset}/shards/val-{shard}-of-{n_shards}.h5",
        test="data/processed/{dataset}/shards/test-{shard}-of-{n_shards}.h5",
        moments="data/processed/{dataset}/shards/moments-{shard}-of-{n_shards}.json",
    wildcard_constraints:
        shard=r"\d{5}",
        n_shards=r"\d{5}",
    params:
        hydra=dataset_hydra_args,
        settings=dataset_settings,
        shard=lambda wildcards: int(wildcards.shard),
    log:
        "data/processed/{dataset}/logs/preprocess_{shard}-of-{n_shards}.log",
    threads: 2
    resources:
        mem_mb=4000,
        runtime=240,
    shell:
        "python -m pipeline.preprocess {params.hydra} data.preprocess_shard={params.shard} > {log:q} 2>&1"


rule preprocess:
    """Turn a dataset's raw files into train/val/test sets files and normalisation statistics, or
    join its shards into them (data.preprocess_shards > 1)."""
    input:
        preprocess_inputs,
    output:
        train="data/processed/{dataset}/train.h5",
        val="data/processed/{dataset}/val.h5",
        test="data/processed/{dataset}/test.h5",
        normalisation="data/processed/{dataset}/normalisation.json",
    params:
        hydra=dataset_hydra_args,
        settings=dataset_settings,
        join=preprocess_join,
    log:
        "data/processed/{dataset}/logs/preprocess.log",
    threads: 2
    resources:
        mem_mb=4000,
        runtime=240,
    shell:
        "python -m pipeline.preprocess {params.hydra} {params.join} > {log:q} 2>&1"
