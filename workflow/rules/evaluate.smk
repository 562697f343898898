# scib-metrics and UMAP of every embedding of a dataset, in one job (JAX/numba compile once).


rule evaluate:
    input:
        prepared=rules.prepare.output.prepared,
        embeddings=model_embeddings,
    output:
        metrics="results/{dataset}/metrics.csv",
        umap="results/{dataset}/umap.csv",
    benchmark:
        "results/benchmarks/evaluate/{dataset}.tsv"
    log:
        "results/logs/evaluate/{dataset}.log",
    conda:
        "../../envs/sigmoid-sc.yaml"
    threads: 2
    params:
        evaluate=section_json("evaluate"),
        # compiled JAX programs persist across jobs and runs (a JAX_COMPILATION_CACHE_DIR set
        # in the environment wins)
        jax_cache="results/.cache/jax",
    message:
        "evaluate {wildcards.dataset}: every embedding"
    shell:
        'JAX_COMPILATION_CACHE_DIR="${{JAX_COMPILATION_CACHE_DIR:-{params.jax_cache}}}"'
        " OMP_NUM_THREADS={threads}"
        " NUMBA_NUM_THREADS={threads}"
        " python -m sigmoid_sc.cli evaluate --dataset {wildcards.dataset:q} --prepared {input.prepared:q}"
        " --params-json {params.evaluate:q}"
        " --embeddings {input.embeddings:q} --metrics {output.metrics:q} --umap {output.umap:q}"
        " > {log:q} 2>&1"
