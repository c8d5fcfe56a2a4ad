# Weight-space geometry of transformer language models.
# Run from the repository root:  snakemake --cores 1 --resources gpu=1
# The README documents the config keys, the output layout and the cluster recipe.
from snakemake.utils import min_version

min_version("9.0")


configfile: "config/config.yaml"


include: "workflow/rules/common.smk"
include: "workflow/rules/extract.smk"
include: "workflow/rules/subspaces.smk"
include: "workflow/rules/report.smk"


rule all:
    input:
        all_targets(),
    default_target: True
