# Download stage: any dataset entry (scanpy, synthetic, path, url) -> results/<dataset>/raw.h5ad.
#
# url entries are streamed, resumed, retried with back-off and verified (size, sha256, format)
# by sigmoid_sc.fetch; a failed download leaves no raw.h5ad. Checksums the config does not
# give are recorded in the lock file next to the config in use (configs/paper.yaml ->
# configs/paper.lock.yaml, to be committed) and enforced on every later download;
# `download: {require_checksum: true}` refuses files whose checksum is known nowhere.
# Helpers (download_entry, download_lockfile, ...) live in common.smk, as the lint wants.
# Retries happen inside the job (per address, exponential back-off, then the mirrors), so the
# rule itself needs no Snakemake-level `retries:`.

# Fetch (or generate), read and check one dataset.
rule download:
    input:
        local=download_local_input,
    output:
        raw="results/{dataset}/raw.h5ad",
    params:
        entry=lambda wildcards: json.dumps(download_entry(wildcards), sort_keys=True),
        cache_dir=DOWNLOAD["cache_dir"],
        lockfile=download_lockfile_option,
        require_checksum=(
            "--require-checksum" if DOWNLOAD["require_checksum"] else ""
        ),
    benchmark:
        "results/benchmarks/download/{dataset}.tsv"
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
        " --cache-dir {params.cache_dir:q} {params.lockfile}"
        " {params.require_checksum} > {log:q} 2>&1"
