"""The whole DAG of a tiny config, sent through ``--profile profiles/slurm`` to a real SLURM.

Checks that every job of the DAG ran as a SLURM job (its SLURM job id in Snakemake's log, its
record in slurmctld, its log under .snakemake/slurm_logs/), that the train and embed jobs and no
others asked SLURM for a GPU, and that the tables hold the expected rows and sane values.

Needs a single-node SLURM with a (fake) GPU: ``bash .ci/setup-slurm.sh`` (as root) installs
and starts one, and the fixture starts an installed one itself when none answers; see
tests/conftest_slurm.py for who stops it. Skipped without SLURM, except under CI=true, where
that fails. The DAG run takes 4-8 minutes on 2 cores, by their load (most of it the plugin's
status-check back-off and evaluate's compilation), so it is submitted when the session starts
if a SLURM answers then, and runs beside the other tests; the profile checks take seconds.
"""

from __future__ import annotations

import math
import os
import re
from collections import Counter
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml
from conftest_slurm import (  # noqa: F401  (slurm_cluster is a fixture)
    DAG_CONFIG,
    REPO,
    slurm_cluster,
    start_dag,
    started_dag,
)
from conftest_workflow import output_of, snakemake

CONFIG = DAG_CONFIG
#: the profile gives these `gpu: 1` (of the tiny DAG's rules)
GPU_RULES = {"train", "embed", "embed_untrained"}
PROFILE = REPO / "profiles" / "slurm" / "config.yaml"


@pytest.fixture(scope="module")
def slurm_run(slurm_cluster, tmp_path_factory):  # noqa: F811
    """The tiny DAG through the SLURM profile, once: the run started with the session
    (tests/conftest_slurm.py), else one started now; what the checks need."""
    dag = started_dag() or start_dag(tmp_path_factory.mktemp("slurm"), slurm_cluster.partition)
    run = dag.wait()
    assert not run["timed_out"], f"the SLURM DAG did not finish in time:\n{run['log'][-8000:]}"
    assert run["returncode"] == 0, (
        f"snakemake --profile profiles/slurm failed:\n{run['log'][-8000:]}"
    )
    return run


def rule_of(logfile: str) -> str:
    """The rule of a job from its SLURM log path (.snakemake/slurm_logs/rule_<rule>/...)."""
    match = re.search(r"slurm_logs/rule_([A-Za-z0-9_]+?)/", logfile)
    assert match, f"unexpected SLURM log path {logfile}"
    return match.group(1)


@pytest.mark.slurm
@pytest.mark.slow
@pytest.mark.timeout(1200)
def test_every_job_ran_as_a_slurm_job(slurm_run):
    expected, submitted, jobs = slurm_run["expected"], slurm_run["submitted"], slurm_run["jobs"]
    assert expected["train"] == 2 and expected["embed"] == 2, expected  # 2 attentions x 1 seed
    # every job of the DAG (except the target `all`) was submitted once, and only those
    ran = Counter(rule_of(logfile) for _, _, logfile in submitted)
    assert ran == expected, f"submitted {dict(ran)}, DAG has {dict(expected)}"
    slurm_ids = [slurm_id for _, slurm_id, _ in submitted]
    assert len(set(slurm_ids)) == len(slurm_ids), "a SLURM job id was reported twice"
    for _, slurm_id, logfile in submitted:
        rule = rule_of(logfile)
        record = jobs.get(slurm_id)
        assert record is not None, f"SLURM never knew job {slurm_id} ({rule})"
        assert record["JobState"] == "COMPLETED", f"job {slurm_id} ({rule}): {record['JobState']}"
        # the plugin tags each job with its rule; slurmctld echoes it back
        assert record.get("Comment", "").startswith(f"rule_{rule}"), record.get("Comment")
        # the partition came from $SIGMOID_SC_SLURM_PARTITION through default-resources
        assert record.get("Partition") == slurm_run["partition"], record.get("Partition")
        # SLURM's own log of the job, kept by slurm-keep-successful-logs
        log_path = Path(logfile.replace("%j", slurm_id))
        assert log_path.is_file(), f"no SLURM log {log_path} for job {slurm_id} ({rule})"
        assert log_path.stat().st_size > 0


@pytest.mark.slurm
@pytest.mark.slow
@pytest.mark.timeout(1200)
def test_gpu_rules_asked_for_a_gpu(slurm_run):
    for _, slurm_id, logfile in slurm_run["submitted"]:
        rule = rule_of(logfile)
        record = slurm_run["jobs"][slurm_id]
        requested = record.get("TresPerJob", "") + record.get("TresPerNode", "")
        if rule in GPU_RULES:
            assert "gpu:1" in requested, f"{rule} job {slurm_id} requested {requested!r}"
        else:
            assert "gpu" not in requested, f"CPU rule {rule} job {slurm_id} asked for {requested!r}"
    # and sbatch was called with the plugin's GPU flag for exactly those rules
    calls = re.findall(r"sbatch call: (sbatch .*?--comment (\S+).*)$", slurm_run["log"], re.M)
    assert calls, "no sbatch call in the verbose log"
    for call, comment in calls:
        rule = comment.removeprefix("rule_").split("_wildcards_")[0]
        assert ("--gpus=1" in call) == (rule in GPU_RULES), call[:300]


@pytest.mark.slurm
@pytest.mark.slow
@pytest.mark.timeout(1200)
def test_outputs_are_right(slurm_run):
    workdir = slurm_run["workdir"]
    config = yaml.safe_load(CONFIG.read_text())
    (dataset,) = config["datasets"]
    table = pd.read_csv(workdir / "results" / "tables" / "representation.csv")
    expected_rows = {
        (dataset, kind, seed) for kind in config["attentions"] for seed in config["seeds"]
    }
    expected_rows.add((dataset, "pca", -1))
    # the untrained encoders (seed-0 initial weights), a baseline beside PCA
    expected_rows |= {(dataset, f"untrained_{kind}", 0) for kind in config["attentions"]}
    assert set(zip(table["dataset"], table["method"], table["seed"])) == expected_rows
    assert len(table) == len(expected_rows)
    for metric in [
        "asw_label",
        "nmi_kmeans",
        "ari_kmeans",
        "nmi_leiden",
        "clisi",
        "isolated_labels",
        "asw_batch",
        "ilisi",
        "graph_connectivity",
    ]:
        values = table[metric].to_numpy(float)
        assert np.isfinite(values).all(), (metric, values)
        lower = -1.0 if metric.startswith("ari") else 0.0
        assert ((values >= lower) & (values <= 1.0)).all(), (metric, values)
    models = table[table["method"] != "pca"]  # trained and untrained encoders
    assert np.isfinite(models["val_loss"]).all() and (models["val_loss"] > 0).all()
    assert table.loc[table["method"] == "pca", "val_loss"].isna().all()

    # every row scores the same test cells, as many as the embeddings hold
    n_test = int(table["n_cells"].iloc[0])
    assert set(table["n_cells"]) == {n_test} and n_test > 0
    for kind in config["attentions"]:
        with np.load(workdir / "results" / dataset / "embed" / f"{kind}_seed0.npz") as npz:
            assert npz["X_emb"].shape == (n_test, config["model"]["d_model"])
            assert str(npz["method"]) == kind
    # each training run did every step
    for kind in config["attentions"]:
        history = pd.read_csv(
            workdir / "results" / dataset / "train" / f"{kind}_seed0" / "history.csv"
        )
        assert history.loc[history["split"] == "train", "step"].max() == config["train"]["steps"]
        val = history.loc[history["split"] == "val", "loss"]
        assert len(val) >= 2 and all(math.isfinite(v) for v in val)
        assert not (
            workdir / "results" / dataset / "train" / f"{kind}_seed0" / "checkpoint.pt"
        ).exists()

    summary = pd.read_csv(workdir / "results" / "tables" / "representation_summary.csv")
    asw = summary[(summary["dataset"] == dataset) & (summary["metric"] == "asw_label")]
    assert len(asw) == 1
    row = table.set_index("method")["asw_label"]
    assert asw["softmax_mean"].iloc[0] == pytest.approx(row["softmax"])
    assert asw["sigmoid_mean"].iloc[0] == pytest.approx(row["sigmoid"])
    for figure in ["metrics", f"umap_{dataset}", f"loss_{dataset}"]:
        for ext in ["png", "pdf"]:
            path = workdir / "results" / "figures" / f"{figure}.{ext}"
            assert path.is_file() and path.stat().st_size > 1000, path


# ----------------------------------------------------------------------------------------------
# the profile itself (no SLURM needed)


def workflow_rules() -> set[str]:
    rules = set()
    for smk in [REPO / "Snakefile", *(REPO / "workflow" / "rules").glob("*.smk")]:
        text = smk.read_text()
        # plain rules, checkpoints, and rules that reuse another's body under a new name
        rules |= set(re.findall(r"^(?:rule|checkpoint) (\w+):", text, re.M))
        rules |= set(re.findall(r"^use rule \w+ as (\w+) with:", text, re.M))
    return rules


def test_profile_names_only_rules_of_the_workflow():
    # Snakemake ignores set-resources of an unknown rule: a typo would silently drop a GPU
    profile = yaml.safe_load(PROFILE.read_text())
    unknown = set(profile["set-resources"]) - workflow_rules()
    assert not unknown, f"profiles/slurm sets resources of rules that do not exist: {unknown}"


def test_profile_gpu_rules_and_status_command():
    profile = yaml.safe_load(PROFILE.read_text())
    assert profile["executor"] == "slurm"
    assert profile["slurm-status-command"] == "squeue"  # no slurmdbd: sacct would hang the run
    for rule in ["train", "embed", "kernel_benchmark"]:
        assert profile["set-resources"][rule]["gpu"] == 1, rule
    defaults = profile["default-resources"]
    assert defaults["slurm_partition"] == "$SIGMOID_SC_SLURM_PARTITION"
    assert defaults["slurm_account"] == "$SIGMOID_SC_SLURM_ACCOUNT"
    assert {"mem_mb", "runtime"} <= set(defaults)
    # threads and scheduler resources live in rules and profiles, never in the workflow config
    config = yaml.safe_load((REPO / "config.yaml").read_text())
    assert not {"threads", "resources", "set-resources", "set-threads"} & set(config)


def test_profile_every_entry_is_commented():
    lines = PROFILE.read_text().splitlines()
    for i, line in enumerate(lines):
        # top-level keys and rule names under set-resources each follow a comment line
        if re.match(r"^[a-z][\w-]*:", line) or re.match(r"^  \w+:$", line):
            assert lines[i - 1].lstrip().startswith("#"), f"uncommented entry: {line!r}"


def test_profile_parses_and_reads_the_environment(tmp_path):
    """A dry run of the tiny DAG through the profile, with this Snakemake and plugin."""
    env = {**os.environ, "SIGMOID_SC_SLURM_PARTITION": "gpu", "SIGMOID_SC_SLURM_ACCOUNT": "lab"}
    out = snakemake(
        tmp_path, "--profile", str(PROFILE.parent), "--dry-run", "--verbose", configfile=CONFIG,
        env=env, timeout=120,
    )  # fmt: skip
    text = output_of(out)
    assert out.returncode == 0, text[-5000:]
    # the target rule's block shows the default resources, placeholders filled from the env
    match = re.search(r"^rule all:\n(?:    .*\n)*?    resources: (.*)$", text, re.M)
    assert match, text[-3000:]
    fields = dict(re.findall(r"(\w+)=([^,]*)", match.group(1)))
    assert fields["slurm_partition"] == "gpu" and fields["slurm_account"] == "lab", fields
