# Sigmoid vs softmax attention for single-cell foundation models: the whole DAG.
# Per dataset: download -> prepare -> tokenize -> train[attention x seed] -> embed -> evaluate;
# across datasets: aggregate -> tables, figures, report. See README.md and docs/ARCHITECTURE.md.

from snakemake.utils import min_version, validate

min_version("9.0")


# The embedded default. A --configfile given on the command line replaces it instead of
# merging into it: a merge would add the default's datasets to every other config.
if not workflow.overwrite_configfiles:

    configfile: os.path.join(workflow.basedir, "config.yaml")


validate(config, schema="workflow/schemas/config.schema.yaml")


include: "workflow/rules/common.smk"
include: "workflow/rules/download.smk"
include: "workflow/rules/prepare.smk"
include: "workflow/rules/tokenize.smk"
include: "workflow/rules/train.smk"
include: "workflow/rules/embed.smk"
include: "workflow/rules/evaluate.smk"
include: "workflow/rules/aggregate.smk"
include: "workflow/rules/experiments.smk"


# Every table and figure of the run; `snakemake --report results/report.html` afterwards.
rule all:
    default_target: True
    input:
        final_targets(),
