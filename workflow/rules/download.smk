# Download stage: any dataset entry (scanpy, synthetic, path, url) -> results/<dataset>/raw.h5ad.
#
# url entries are streamed, resumed, retried with back-off and verified (size, sha256, format)
# by sigmoid_sc.download; a failed download leaves no raw.h5ad. Checksums the config does not
# give are recorded in the lock file next to the config in use (configs/paper.yaml ->
# configs/paper.lock.yaml, to be committed) and enforced on every later download;
# `download: {require_checksum: true}` refuses files whose checksum is known nowhere.
# Retries happen inside the job (per address, exponential back-off, then the mirrors), so the
# rule itself needs no Snakemake-level `retries:`.

# the download section (the schema's defaults fill a missing section only at its top level)
DOWNLOAD = config.get("download") or {}


def download_lockfile():
    """The lock file: download.lockfile if set, else `<config stem>.lock.yaml` beside it."""
    if DOWNLOAD.get("lockfile"):
        return DOWNLOAD["lockfile"]
    if workflow.configfiles:
        config_path = str(workflow.configfiles[-1])
        stem = os.path.splitext(os.path.basename(config_path))[0]
        return os.path.join(os.path.dirname(config_path), f"{stem}.lock.yaml")
    return "config.lock.yaml"


def download_entry(wildcards):
    """The dataset's entry, completed for the CLI.

    url: the download section's retries and timeout_s as defaults the entry may override;
    path: a relative path is resolved against data_dir when the config sets one.
    """
    entry = dict(config["datasets"][wildcards.dataset])
    if entry["source"] == "url":
        for key in ("retries", "timeout_s"):
            if DOWNLOAD.get(key) is not None:
                entry.setdefault(key, DOWNLOAD[key])
    elif entry["source"] == "path" and config.get("data_dir"):
        entry["path"] = os.path.join(config["data_dir"], entry["path"])
    return entry


def download_local_input(wildcards):
    """A path entry's file, so Snakemake reruns the branch when the file changes."""
    entry = download_entry(wildcards)
    return [entry["path"]] if entry["source"] == "path" else []


# Fetch (or generate), read and check one dataset.
rule download:
    input:
        local=download_local_input,
    output:
        raw="results/{dataset}/raw.h5ad",
    params:
        entry=lambda wildcards: json.dumps(download_entry(wildcards), sort_keys=True),
        cache_dir=DOWNLOAD.get("cache_dir", "results/.cache/downloads"),
        lockfile=download_lockfile(),
        require_checksum=(
            "--require-checksum" if DOWNLOAD.get("require_checksum") else ""
        ),
    log:
        "results/logs/download/{dataset}.log",
    conda:
        "../../envs/sigmoid-sc.yaml"
    message:
        "download {wildcards.dataset}"
    threads: 1
    shell:
        "python -m sigmoid_sc.cli download --dataset {wildcards.dataset:q}"
        " --entry-json {params.entry:q} --out {output.raw:q}"
        " --cache-dir {params.cache_dir:q} --lockfile {params.lockfile:q}"
        " {params.require_checksum} > {log:q} 2>&1"
