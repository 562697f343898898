# Embeddings of the held-out (test) cells: one per trained model, plus the PCA baseline.


rule embed:
    input:
        tokens=rules.tokenize.output.tokens,
        model=rules.train.output.model,
    output:
        embedding="results/{dataset}/embed/{attention}_seed{seed}.npz",
    benchmark:
        "results/benchmarks/embed/{dataset}/{attention}_seed{seed}.tsv"
    log:
        "results/logs/embed/{dataset}/{attention}_seed{seed}.log",
    conda:
        "../../envs/sigmoid-sc.yaml"
    threads: 1
    resources:
        gpu=gpus_per_job(),
    params:
        device=lookup(within=config, dpath="device"),
    message:
        "embed {wildcards.dataset}: {wildcards.attention} attention, seed {wildcards.seed}"
    shell:
        "OMP_NUM_THREADS={threads} MKL_NUM_THREADS={threads}"
        " python -m sigmoid_sc.cli embed --dataset {wildcards.dataset:q} --tokens {input.tokens:q}"
        " --model {input.model:q} --device {params.device} --output {output.embedding:q}"
        " > {log:q} 2>&1"


# The baseline a model must beat: PCA of the same test cells' log-normalised expression.
rule pca:
    input:
        prepared=rules.prepare.output.prepared,
    output:
        embedding="results/{dataset}/embed/pca.npz",
    benchmark:
        "results/benchmarks/pca/{dataset}.tsv"
    log:
        "results/logs/embed/{dataset}/pca.log",
    conda:
        "../../envs/sigmoid-sc.yaml"
    threads: 1
    params:
        n_comps=50,
    message:
        "PCA baseline of {wildcards.dataset}"
    shell:
        "OMP_NUM_THREADS={threads} python -m sigmoid_sc.cli pca --dataset {wildcards.dataset:q}"
        " --input {input.prepared:q} --n-comps {params.n_comps} --output {output.embedding:q}"
        " > {log:q} 2>&1"
