# The pipeline's workflow: `snakemake --cores N` runs every experiment in workflow/config.yaml.
# Rules only wire stages together (files in, files out); every stage is `python -m pipeline.<stage>`.
from snakemake.utils import min_version

min_version("9.0")


configfile: "workflow/config.yaml"


report: "workflow/report/workflow.rst"


include: "workflow/rules/common.smk"
include: "workflow/rules/data.smk"
include: "workflow/rules/toy.smk"
include: "workflow/rules/train.smk"
include: "workflow/rules/sample.smk"
include: "workflow/rules/report.smk"


# Downloads run where Snakemake runs (a login node), never as cluster jobs: compute nodes often
# have no route to the internet.
localrules:
    download,


onstart:
    refuse_gpus_the_cluster_lacks()


rule all:
    default_target: True
    input:
        expand("results/{experiment}/toy/metrics.json", experiment=EXPERIMENTS),
        expand("results/{experiment}/evaluate/metrics.json", experiment=EXPERIMENTS),
        expand("results/{experiment}/likelihood/metrics.json", experiment=config["likelihood"]),
