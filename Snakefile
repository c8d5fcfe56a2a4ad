# Weight-space geometry of transformer language models.
# Run from the repository root:  snakemake --cores 1 --resources gpu=1
# The README documents the config keys, the output layout and the cluster recipe.
from snakemake.utils import min_version

min_version("9.0")


# The shipped defaults, found next to this Snakefile whatever the working directory;
# a user's --configfile is applied on top (and its `models` replace the shipped ones).
configfile: f"{workflow.basedir}/config/config.yaml"


report: "workflow/report/workflow.rst"


include: "workflow/rules/common.smk"
include: "workflow/rules/extract.smk"
include: "workflow/rules/subspaces.smk"
include: "workflow/rules/circuits.smk"
include: "workflow/rules/report.smk"
include: "workflow/rules/compare.smk"
include: "workflow/rules/trajectory.smk"


rule all:
    default_target: True
    input:
        all_targets(),


# `snakemake --cores 1 download`: fetch the hub-id models' weights (e.g. on a login node).
rule download:
    input:
        download_targets(),
