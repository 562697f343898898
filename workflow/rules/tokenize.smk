# Rank-value encoding of every cell (highest-expressed genes first, at most max_len tokens).


rule tokenize:
    input:
        prepared=rules.prepare.output.prepared,
    output:
        tokens="results/{dataset}/tokens.npz",
    benchmark:
        "results/benchmarks/tokenize/{dataset}.tsv"
    log:
        "results/logs/tokenize/{dataset}.log",
    conda:
        "../../envs/sigmoid-sc.yaml"
    threads: 1
    params:
        tokenize=section_json("tokenize"),
    message:
        "tokenize {wildcards.dataset}"
    shell:
        "python -m sigmoid_sc.cli tokenize --dataset {wildcards.dataset:q} --params-json {params.tokenize:q}"
        " --input {input.prepared:q} --output {output.tokens:q} > {log:q} 2>&1"
