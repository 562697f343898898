# Helpers shared by the rules: dataset list, config sections as JSON, target lists.
# Rules stay declarations; everything computed lives here.

import json
import os
import re
import sys

# Rules call the package's CLI as `python -m sigmoid_sc.cli` (= `sigmoid-sc`): with the Python
# that runs Snakemake (a venv needs no activation) or, under --sdm conda, the rule's conda env
# (its bin comes first); src/ on PYTHONPATH makes the package importable in either.
os.environ.update(
    PATH=os.pathsep.join([os.path.dirname(sys.executable), os.environ.get("PATH", "")]),
    PYTHONPATH=os.pathsep.join(
        p
        for p in [os.path.join(workflow.basedir, "src"), os.environ.get("PYTHONPATH")]
        if p
    ),
)

DATASETS = list(config["datasets"])
SEEDS = [int(seed) for seed in config["seeds"]]
ATTENTIONS = list(config["attentions"])
METHODS = ATTENTIONS + ["pca"]


wildcard_constraints:
    dataset="|".join(re.escape(name) for name in DATASETS),
    attention="softmax|sigmoid",
    seed=r"\d+",


def dataset_entry_json(wildcards):
    """The dataset's config entry, as the JSON the CLI's --entry-json takes."""
    return json.dumps(config["datasets"][wildcards.dataset], sort_keys=True)


def section_json(section):
    """A top-level config section (prepare, tokenize, model, ...) as JSON for --params-json."""
    return json.dumps(config[section], sort_keys=True)


def gpus_per_job():
    """GPUs a train/embed job asks the scheduler for: none on cpu, one otherwise.

    Profiles may override it (--set-resources train:gpu=2 runs torchrun inside the allocation).
    """
    return 0 if config["device"] == "cpu" else 1


def model_embeddings(wildcards):
    """Embeddings of one dataset's test cells: every attention x seed, then PCA."""
    return expand(
        "results/{dataset}/embed/{attention}_seed{seed}.npz",
        dataset=wildcards.dataset,
        attention=ATTENTIONS,
        seed=SEEDS,
    ) + [f"results/{wildcards.dataset}/embed/pca.npz"]


def dataset_histories(wildcards):
    """history.csv of every training run of one dataset."""
    return expand(
        "results/{dataset}/train/{attention}_seed{seed}/history.csv",
        dataset=wildcards.dataset,
        attention=ATTENTIONS,
        seed=SEEDS,
    )


def all_metrics():
    return expand("results/{dataset}/metrics.csv", dataset=DATASETS)


def all_histories():
    return expand(
        "results/{dataset}/train/{attention}_seed{seed}/history.csv",
        dataset=DATASETS,
        attention=ATTENTIONS,
        seed=SEEDS,
    )


def final_targets():
    """Every table and figure of a run (the inputs of rule all)."""
    return (
        expand(
            "results/tables/{table}",
            table=[
                "representation.csv",
                "representation_summary.csv",
                "representation_summary.md",
                "representation_summary.tex",
            ],
        )
        + expand("results/figures/metrics.{ext}", ext=["png", "pdf"])
        + expand(
            "results/figures/{kind}_{dataset}.{ext}",
            kind=["umap", "loss"],
            dataset=DATASETS,
            ext=["png", "pdf"],
        )
    )
