# Rank-value encoding of every cell (highest-expressed genes first, at most max_len tokens).


rule tokenize:
    input:
        prepared=rules.prepare.output.prepared,
    output:
        tokens="results/{dataset}/tokens.npz",
    params:
        tokenize=section_json("tokenize"),
    log:
        "results/logs/tokenize/{dataset}.log",
    conda:
        "../../envs/sigmoid-sc.yaml"
    message:
        "tokenize {wildcards.dataset}"
    threads: 1
    shell:
        "python -m sigmoid_sc.cli tokenize --dataset {wildcards.dataset:q} --params-json {params.tokenize:q}"
        " --input {input.prepared:q} --output {output.tokens:q} > {log:q} 2>&1"
