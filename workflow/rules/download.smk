# TEMPORARY: downloads engineer replaces this
# Turn a dataset entry of the config (scanpy, synthetic, path or url) into results/<dataset>/raw.h5ad.


rule download:
    output:
        raw="results/{dataset}/raw.h5ad",
    params:
        entry=dataset_entry_json,
        cache_dir=lookup(within=config, dpath="download/cache_dir"),
    log:
        "results/logs/download/{dataset}.log",
    conda:
        "../../envs/sigmoid-sc.yaml"
    message:
        "download {wildcards.dataset}"
    threads: 1
    shell:
        "python -m sigmoid_sc.cli download --dataset {wildcards.dataset:q} --entry-json {params.entry:q}"
        " --cache-dir {params.cache_dir:q} --out {output.raw:q} > {log:q} 2>&1"
