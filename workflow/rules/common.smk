# Helpers shared by the rules: dataset list, config sections as JSON, target lists.
# Rules stay declarations; everything computed lives here.

import json
import os
import re
import shlex
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
    attention="|".join(sigmoid_sc_config.ATTENTIONS),
    seed=r"\d+",


def section_json(section):
    """A top-level config section (prepare, tokenize, model, ...) as JSON for --params-json."""
    return json.dumps(config[section], sort_keys=True)


def gpus_per_job(rule=None):
    """GPUs a job asks the scheduler for: none on cpu, one otherwise; train: config train_gpus.

    Profiles may override it (--set-resources train:gpu=2); see train_cli().
    """
    if config["device"] == "cpu":
        return 0
    return int(config.get("train_gpus", 1)) if rule == "train" else 1


def train_cli():
    """The shell words that start `sigmoid-sc` in the train rule, chosen by its resources.gpu.

    One GPU (or none): `python -m sigmoid_sc.cli`. N > 1: `python -m torch.distributed.run
    --standalone --nproc_per_node N -m sigmoid_sc.cli`, one DDP process per GPU of the job
    (sigmoid_sc.train; the results do not depend on N up to float rounding). Decided in the
    shell from {resources.gpu}, so a --set-resources override counts and changing N changes
    no param (no rerun of finished models).
    """
    return (
        '$(if [ "{resources.gpu}" -gt 1 ]; then echo python -m torch.distributed.run'
        " --standalone --nproc_per_node {resources.gpu}; else echo python; fi) -m sigmoid_sc.cli"
    )


def model_embeddings(wildcards):
    """Embeddings of one dataset's test cells: every attention x seed, then the baselines (the
    untrained encoder of each attention kind, PCA)."""
    return (
        run_embeddings(wildcards)
        + expand(
            "results/{dataset}/embed/untrained_{attention}.npz",
            dataset=wildcards.dataset,
            attention=ATTENTIONS,
        )
        + [f"results/{wildcards.dataset}/embed/pca.npz"]
    )


def dataset_histories(wildcards):
    """history.csv of every training run of one dataset."""
    return expand(
        "results/{dataset}/train/{attention}_seed{seed}/history.csv",
        dataset=wildcards.dataset,
        attention=ATTENTIONS,
        seed=SEEDS,
    )


def run_embeddings(wildcards):
    """The embedding of every training run of one dataset, in the order of dataset_histories:
    each holds its run's attention and seed, from the model's record."""
    return expand(
        "results/{dataset}/embed/{attention}_seed{seed}.npz",
        dataset=wildcards.dataset,
        attention=ATTENTIONS,
        seed=SEEDS,
    )


# --- download (written by the downloads engineer; the rule is in download.smk) ---

DOWNLOAD = config["download"]


def download_lockfile():
    """The lock file: download.lockfile if set, else `<config stem>.lock.yaml` beside it."""
    if DOWNLOAD["lockfile"]:
        return DOWNLOAD["lockfile"]
    if workflow.configfiles:
        config_path = str(workflow.configfiles[-1])
        stem = os.path.splitext(os.path.basename(config_path))[0]
        return os.path.join(os.path.dirname(config_path), f"{stem}.lock.yaml")
    return "config.lock.yaml"


def download_lockfile_option(wildcards):
    """`--lockfile PATH` for url entries; nothing for the others.

    The lock file's path follows the config file's, so it must not be a param of datasets that
    never read it: a copied or moved config would otherwise rerun every branch.
    """
    if config["datasets"][wildcards.dataset]["source"] != "url":
        return ""
    return f"--lockfile {shlex.quote(str(download_lockfile()))}"


def download_entry(wildcards):
    """The dataset's entry, completed for the CLI (without the keys of the pretraining
    protocol: a role or holdout changes no download).

    url: the download section's retries and timeout_s as defaults the entry may override;
    path: a relative path is resolved against data_dir when the config sets one.
    """
    entry = {
        key: value
        for key, value in config["datasets"][wildcards.dataset].items()
        if key not in sigmoid_sc_config.PROTOCOL_KEYS  # the pretraining protocol's alone
    }
    if (entry.get("synthetic") or {}).get("gene_names") == "index":
        # the default names (the schema fills the key in): a config that leaves it out keeps
        # the download params it had without the key, so no finished branch reruns
        entry["synthetic"] = {k: v for k, v in entry["synthetic"].items() if k != "gene_names"}
    if entry["source"] == "url":
        for key in ("retries", "timeout_s"):
            entry.setdefault(key, DOWNLOAD[key])
    elif entry["source"] == "path" and config.get("data_dir"):
        entry["path"] = os.path.join(config["data_dir"], entry["path"])
    return entry


def download_local_input(wildcards):
    """A path entry's file, so Snakemake reruns the branch when the file changes."""
    entry = download_entry(wildcards)
    return [entry["path"]] if entry["source"] == "path" else []


# --- targets ---


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
    """Every table and figure of a run (the inputs of `all`): each protocol's (the
    pretraining protocol's: protocol_targets in pretrain_common.smk) and the experiments'."""
    return per_dataset_targets() + protocol_targets() + experiment_targets()


def per_dataset_targets():
    """The per-dataset protocol's tables and figures, when it runs."""
    if "per_dataset" not in PROTOCOLS:
        return []
    return (
        expand(
            "results/tables/{table}",
            table=[
                "representation.csv",
                "representation_summary.csv",
                "representation_summary.md",
                "representation_summary.tex",
                "representation_training.csv",
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


# --- the paper's experiments (workflow/rules/experiments.smk) --------------------------------

EXPERIMENT_OUTPUTS = {
    "stress_test": [
        "results/figures/stress_test.png",
        "results/figures/stress_test.pdf",
        "results/tables/stress_test.csv",
        "results/tables/stress_test_summary.json",
    ],
    "jacobian": [
        "results/figures/jacobian.png",
        "results/figures/jacobian.pdf",
        "results/tables/jacobian.csv",
    ],
    "kernel_benchmark": [
        "results/figures/kernel_tflops.png",
        "results/figures/kernel_tflops.pdf",
        "results/tables/kernel.csv",
        "results/tables/kernel.md",
    ],
    "training_speed": [
        "results/tables/training_speed.csv",
        "results/tables/training_speed.md",
    ],
    "stability_sweep": [
        "results/tables/stability_runs.csv",
        "results/tables/stability_boundary.csv",
        "results/tables/stability_boundary.md",
        "results/figures/stability_lr.png",
        "results/figures/stability_lr.pdf",
        "results/figures/stability_logits.png",
        "results/figures/stability_logits.pdf",
    ],
}


def experiment(name):
    """The experiments.<name> config section (validated, defaults filled)."""
    return config["experiments"][name]


def experiment_targets():
    """Outputs of the experiments whose `enabled` is true."""
    return [
        path
        for name, paths in EXPERIMENT_OUTPUTS.items()
        if experiment(name)["enabled"]
        for path in paths
    ]


def jacobian_run():
    """(dataset, seed) whose trained softmax and sigmoid models the Jacobian analysis reads
    (sigmoid_sc.config checked that they are among datasets and seeds)."""
    section = experiment("jacobian")
    dataset = section["dataset"] or DATASETS[0]
    seed = SEEDS[0] if section["seed"] is None else int(section["seed"])
    return dataset, seed


def jacobian_model(attention):
    dataset, seed = jacobian_run()
    return f"results/{dataset}/train/{attention}_seed{seed}/model.pt"


# --- the stability sweep (sigmoid_sc.stability_sweep): a job per arm x learning rate x seed ---

SWEEP_DIR = "results/experiments/stability_sweep"
SWEEP = experiment("stability_sweep")
#: a learning rate in folder names: 3 significant digits (stability_sweep.lr_tag); the config
#: refuses two rates with one tag
SWEEP_LRS = {f"{float(lr):.3g}": float(lr) for lr in SWEEP["lrs"]}
SWEEP_ARMS = {arm["name"]: arm for arm in SWEEP["arms"]}
SWEEP_SEEDS = [int(seed) for seed in SWEEP["seeds"]]


def sweep_json():
    """The whole section as JSON (the boundary and the tables read every arm and rate)."""
    return json.dumps(SWEEP, sort_keys=True)


def sweep_run_json(wildcards):
    """What one run depends on: the section with its own arm only and without the lists of
    rates and seeds (the job gets its rate and seed on the command line), so that adding a
    rate, a seed or an arm reruns no finished job."""
    section = {k: v for k, v in SWEEP.items() if k not in ("enabled", "lrs", "seeds", "arms")}
    return json.dumps({**section, "arms": [SWEEP_ARMS[wildcards.arm]]}, sort_keys=True)


def sweep_run(arm, tag, seed):
    return f"{SWEEP_DIR}/runs/{arm}/lr{tag}/seed{seed}/summary.json"


def sweep_first_seed_runs(wildcards=None):
    """The first seed's run of every arm and learning rate (the boundary checkpoint's input)."""
    return [sweep_run(arm, tag, SWEEP_SEEDS[0]) for arm in SWEEP_ARMS for tag in SWEEP_LRS]


def sweep_all_runs(wildcards):
    """Every run: the first seed everywhere, the other seeds at the learning rates the
    stability_boundary checkpoint chose for each arm."""
    with open(checkpoints.stability_boundary.get().output[0]) as fh:
        boundary = json.load(fh)["boundary_lrs"]
    runs = sweep_first_seed_runs()
    for arm, lrs in boundary.items():
        runs += [sweep_run(arm, f"{float(lr):.3g}", seed) for lr in lrs for seed in SWEEP_SEEDS[1:]]
    return runs
