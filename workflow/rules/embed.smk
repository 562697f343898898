# Embeddings of the held-out (test) cells: one per trained model (mean pooling, and CLS pooling
# in the same file when model.cls_token is on), plus the baselines: the untrained encoder of each
# kind and PCA.


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


# The untrained baseline: the same encoder at the initial weights of its seed-0 training runs
# (mean pooling), so the tables show what training adds to the architecture.
rule embed_untrained:
    input:
        tokens=rules.tokenize.output.tokens,
    output:
        embedding="results/{dataset}/embed/untrained_{attention}.npz",
    benchmark:
        "results/benchmarks/embed_untrained/{dataset}/{attention}.tsv"
    log:
        "results/logs/embed/{dataset}/untrained_{attention}.log",
    conda:
        "../../envs/sigmoid-sc.yaml"
    threads: 1
    resources:
        gpu=gpus_per_job(),
    params:
        model=section_json("model"),
        mask_prob=lookup(within=config, dpath="train/mask_prob"),
        device=lookup(within=config, dpath="device"),
    message:
        "embed {wildcards.dataset}: untrained {wildcards.attention} encoder"
    shell:
        "OMP_NUM_THREADS={threads} MKL_NUM_THREADS={threads}"
        " python -m sigmoid_sc.cli embed --dataset {wildcards.dataset:q} --tokens {input.tokens:q}"
        " --untrained {wildcards.attention} --model-json {params.model:q}"
        " --mask-prob {params.mask_prob} --device {params.device} --output {output.embedding:q}"
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
