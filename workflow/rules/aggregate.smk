# Across datasets and seeds: tables (sigmoid vs softmax with bootstrap confidence intervals,
# paired tests, baselines, the paper's claim; training per run set) and figures.


rule aggregate:
    input:
        metrics=all_metrics(),
    output:
        table=report(
            "results/tables/representation.csv",
            caption="../report/representation.rst",
            category="Tables",
        ),
        summary_csv=report(
            "results/tables/representation_summary.csv",
            caption="../report/representation_summary.rst",
            category="Tables",
        ),
        summary_md="results/tables/representation_summary.md",
        summary_tex="results/tables/representation_summary.tex",
        training_csv=report(
            "results/tables/representation_training.csv",
            caption="../report/representation_training.rst",
            category="Tables",
        ),
    benchmark:
        "results/benchmarks/aggregate/representation.tsv"
    log:
        "results/logs/aggregate/representation.log",
    conda:
        "../../envs/sigmoid-sc.yaml"
    threads: 1
    params:
        aggregate=section_json("aggregate"),
    message:
        "aggregate: representation tables across datasets and seeds"
    shell:
        "python -m sigmoid_sc.cli aggregate --metrics {input.metrics:q} --params-json {params.aggregate:q}"
        " --table {output.table:q} --summary-csv {output.summary_csv:q}"
        " --summary-md {output.summary_md:q} --summary-tex {output.summary_tex:q}"
        " --training-csv {output.training_csv:q} > {log:q} 2>&1"


# Every metric per dataset: every method side by side (seed spread), the baselines included.
rule figure_metrics:
    input:
        table=rules.aggregate.output.table,
    output:
        png=report(
            "results/figures/metrics.png",
            caption="../report/metrics.rst",
            category="Figures",
            subcategory="Metrics",
        ),
        pdf="results/figures/metrics.pdf",
    benchmark:
        "results/benchmarks/figure_metrics/metrics.tsv"
    log:
        "results/logs/figures/metrics.log",
    conda:
        "../../envs/sigmoid-sc.yaml"
    threads: 1
    message:
        "figure: metrics per dataset"
    shell:
        "python -m sigmoid_sc.cli figures metrics --table {input.table:q}"
        " --png {output.png:q} --pdf {output.pdf:q} > {log:q} 2>&1"


# UMAPs of one dataset's softmax, sigmoid and PCA embeddings side by side, coloured by cell type.
rule figure_umap:
    input:
        umap=rules.evaluate.output.umap,
        metrics=rules.evaluate.output.metrics,
    output:
        png=report(
            "results/figures/umap_{dataset}.png",
            caption="../report/umap.rst",
            category="Figures",
            subcategory="UMAP",
            labels={"dataset": "{dataset}", "figure": "UMAP"},
        ),
        pdf="results/figures/umap_{dataset}.pdf",
    benchmark:
        "results/benchmarks/figure_umap/{dataset}.tsv"
    log:
        "results/logs/figures/umap_{dataset}.log",
    conda:
        "../../envs/sigmoid-sc.yaml"
    threads: 1
    message:
        "figure: UMAPs of {wildcards.dataset}"
    shell:
        "python -m sigmoid_sc.cli figures umap --dataset {wildcards.dataset:q} --umap {input.umap:q}"
        " --metrics {input.metrics:q} --png {output.png:q} --pdf {output.pdf:q} > {log:q} 2>&1"


# Training and validation loss of every run of one dataset, softmax vs sigmoid.
rule figure_loss:
    input:
        histories=dataset_histories,
        embeddings=run_embeddings,
    output:
        png=report(
            "results/figures/loss_{dataset}.png",
            caption="../report/loss.rst",
            category="Figures",
            subcategory="Loss curves",
            labels={"dataset": "{dataset}", "figure": "loss curves"},
        ),
        pdf="results/figures/loss_{dataset}.pdf",
    benchmark:
        "results/benchmarks/figure_loss/{dataset}.tsv"
    log:
        "results/logs/figures/loss_{dataset}.log",
    conda:
        "../../envs/sigmoid-sc.yaml"
    threads: 1
    message:
        "figure: loss curves of {wildcards.dataset}"
    shell:
        "python -m sigmoid_sc.cli figures loss --dataset {wildcards.dataset:q} --histories {input.histories:q}"
        " --embeddings {input.embeddings:q} --png {output.png:q} --pdf {output.pdf:q} > {log:q} 2>&1"
