# QC, normalisation, gene vocabulary and the seeded train/val/test split shared by both attention kinds.


rule prepare:
    input:
        raw=rules.download.output.raw,
    output:
        prepared="results/{dataset}/prepared.h5ad",
    benchmark:
        "results/benchmarks/prepare/{dataset}.tsv"
    log:
        "results/logs/prepare/{dataset}.log",
    conda:
        "../../envs/sigmoid-sc.yaml"
    threads: 1
    params:
        prepare=section_json("prepare"),
    message:
        "prepare {wildcards.dataset}"
    shell:
        "python -m sigmoid_sc.cli prepare --dataset {wildcards.dataset:q} --params-json {params.prepare:q}"
        " --input {input.raw:q} --output {output.prepared:q} > {log:q} 2>&1"
