# Sigmoid vs softmax attention for single-cell foundation models: the whole DAG.
# Per dataset: download -> prepare -> tokenize -> train[attention x seed] -> embed -> evaluate;
# across datasets: aggregate -> tables, figures, report. See README.md and docs/ARCHITECTURE.md.
# With protocol: pretrain | both, one model per attention x seed on a pooled corpus, every
# dataset embedded zero-shot (workflow/rules/pretrain.smk), instead of or beside those.

import os
import sys

from snakemake.utils import min_version

min_version("9.0")

# The package (src/) holds the config's schema and its one validation (sigmoid_sc.config).
sys.path.insert(0, os.path.join(workflow.basedir, "src"))
from sigmoid_sc import config as sigmoid_sc_config


# The embedded default. A --configfile given on the command line replaces it instead of
# merging into it: a merge would add the default's datasets to every other config.
if not workflow.overwrite_configfiles:

    configfile: os.path.join(workflow.basedir, "config.yaml")


# Unknown keys, wrong values and inconsistent sections fail here, before any job, with a
# message that names the key; the schema's defaults fill what the config leaves out.
sigmoid_sc_config.validate(config)


include: "workflow/rules/common.smk"
include: "workflow/rules/pretrain_common.smk"
include: "workflow/rules/download.smk"
include: "workflow/rules/prepare.smk"
include: "workflow/rules/tokenize.smk"
include: "workflow/rules/train.smk"
include: "workflow/rules/embed.smk"
include: "workflow/rules/evaluate.smk"
include: "workflow/rules/aggregate.smk"
include: "workflow/rules/experiments.smk"
include: "workflow/rules/pretrain.smk"


# Every table and figure of the run; `snakemake --report results/report.html` afterwards.
rule all:
    default_target: True
    input:
        final_targets(),
