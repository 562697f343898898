# The pretraining protocol (protocol: pretrain | both), beside the per-dataset one:
#
#   results/<dataset>/prepared.h5ad ─┬─ holdout (a side) ─ results/pretrain/<unit>/selected.h5ad
#                                    └──────────────────────┐
#   corpus units' prepared ─ vocabulary ─ results/pretrain/corpus/{vocabulary.npz,cells.csv}
#   <unit> prepared + vocabulary ─ tokenize --vocabulary ─ results/pretrain/<unit>/tokens.npz
#   corpus units' tokens ─ corpus ─ results/pretrain/corpus/tokens.npz
#     ─ train[attention x seed] ─ results/pretrain/corpus/train/<attention>_seed<S>/model.pt
#   every unit: embed with each model, the untrained encoders, PCA ─ results/pretrain/<unit>/embed/
#     ─ evaluate ─ results/pretrain/<unit>/metrics.csv
#   aggregate per role (corpus, zero_shot) ─ results/pretrain/tables/<role>/representation*
#   protocols ─ results/tables/representation_protocols* (the protocols side by side)
#
# A unit's branch (its tokens, embeddings, metrics) depends on the corpus only through the
# vocabulary and the models: rerunning it reruns no pretraining. The stages are the
# per-dataset protocol's own (use rule ... with: new inputs and outputs); helpers in
# pretrain_common.smk.


# One side of a holdout of a prepared dataset, split kept: the corpus side or the held-out one.
rule pretrain_holdout:
    input:
        prepared=unit_source_prepared,
    output:
        selected="results/pretrain/{dataset}/selected.h5ad",
    wildcard_constraints:
        dataset=UNIT_WILDCARD,
    benchmark:
        "results/benchmarks/pretrain_holdout/{dataset}.tsv"
    log:
        "results/logs/pretrain/{dataset}/holdout.log",
    conda:
        "../../envs/sigmoid-sc.yaml"
    threads: 1
    params:
        selection=unit_selection_json,
    message:
        "holdout: the cells of {wildcards.dataset}"
    shell:
        "python -m sigmoid_sc.cli holdout --dataset {wildcards.dataset:q} --input {input.prepared:q}"
        " --selection-json {params.selection:q} --output {output.selected:q} > {log:q} 2>&1"


# The corpus' cells (sampling), its gene vocabulary by symbol and its medians, from the corpus
# units alone (the floor is not a param: changing it retrains nothing).
rule pretrain_vocabulary:
    input:
        prepared=corpus_prepared(),
    output:
        vocabulary="results/pretrain/corpus/vocabulary.npz",
        cells="results/pretrain/corpus/cells.csv",
        table="results/pretrain/tables/corpus.csv",
    benchmark:
        "results/benchmarks/pretrain_vocabulary/vocabulary.tsv"
    log:
        "results/logs/pretrain/vocabulary.log",
    conda:
        "../../envs/sigmoid-sc.yaml"
    threads: 1
    params:
        names=CORPUS_UNITS,
        sampling=corpus_sampling_json(),
        tokenize=section_json("tokenize"),
    message:
        "pretraining corpus: cells, gene vocabulary and medians of {params.names}"
    shell:
        "python -m sigmoid_sc.cli vocabulary --names {params.names:q} --prepared {input.prepared:q}"
        " --pretrain-json {params.sampling:q} --tokenize-json {params.tokenize:q}"
        " --vocabulary {output.vocabulary:q} --cells {output.cells:q} --table {output.table:q}"
        " > {log:q} 2>&1"


# Rank-value tokens of one unit with the corpus vocabulary and medians; its match rates.
rule pretrain_tokenize:
    input:
        prepared=unit_prepared,
        vocabulary=rules.pretrain_vocabulary.output.vocabulary,
    output:
        tokens="results/pretrain/{dataset}/tokens.npz",
        rates="results/pretrain/{dataset}/match.json",
    wildcard_constraints:
        dataset=UNIT_WILDCARD,
    benchmark:
        "results/benchmarks/pretrain_tokenize/{dataset}.tsv"
    log:
        "results/logs/pretrain/{dataset}/tokenize.log",
    conda:
        "../../envs/sigmoid-sc.yaml"
    threads: 1
    params:
        tokenize=section_json("tokenize"),
        floor=unit_match_floor,
    message:
        "tokenize {wildcards.dataset} with the corpus vocabulary"
    shell:
        "python -m sigmoid_sc.cli tokenize --dataset {wildcards.dataset:q}"
        " --params-json {params.tokenize:q} --input {input.prepared:q} --output {output.tokens:q}"
        " --vocabulary {input.vocabulary:q} --match-rates {output.rates:q} {params.floor}"
        " > {log:q} 2>&1"


# The corpus' tokens: the chosen training and validation cells of every corpus unit.
rule pretrain_corpus:
    input:
        vocabulary=rules.pretrain_vocabulary.output.vocabulary,
        cells=rules.pretrain_vocabulary.output.cells,
        tokens=corpus_tokens(),
    output:
        tokens="results/pretrain/corpus/tokens.npz",
    benchmark:
        "results/benchmarks/pretrain_corpus/corpus.tsv"
    log:
        "results/logs/pretrain/corpus.log",
    conda:
        "../../envs/sigmoid-sc.yaml"
    threads: 1
    params:
        names=CORPUS_UNITS,
    message:
        "pretraining corpus: tokens of {params.names}"
    shell:
        "python -m sigmoid_sc.cli corpus --vocabulary {input.vocabulary:q} --cells {input.cells:q}"
        " --names {params.names:q} --tokens {input.tokens:q} --output {output.tokens:q}"
        " > {log:q} 2>&1"


# One encoder per attention kind and seed on the pooled corpus (the dataset wildcard: corpus).
use rule train as pretrain_train with:
    input:
        tokens=rules.pretrain_corpus.output.tokens,
    output:
        model="results/pretrain/{dataset}/train/{attention}_seed{seed}/model.pt",
        history="results/pretrain/{dataset}/train/{attention}_seed{seed}/history.csv",
    wildcard_constraints:
        dataset="corpus",
    benchmark:
        "results/benchmarks/pretrain_train/{dataset}/{attention}_seed{seed}.tsv"
    log:
        "results/logs/pretrain/{dataset}/train/{attention}_seed{seed}.log",
    message:
        "pretrain on the corpus: {wildcards.attention} attention, seed {wildcards.seed}"


# Zero-shot embeddings of a unit's test cells by a pretrained model.
use rule embed as pretrain_embed with:
    input:
        tokens=rules.pretrain_tokenize.output.tokens,
        model="results/pretrain/corpus/train/{attention}_seed{seed}/model.pt",
    output:
        embedding="results/pretrain/{dataset}/embed/{attention}_seed{seed}.npz",
    wildcard_constraints:
        dataset=UNIT_WILDCARD,
    benchmark:
        "results/benchmarks/pretrain_embed/{dataset}/{attention}_seed{seed}.tsv"
    log:
        "results/logs/pretrain/{dataset}/embed/{attention}_seed{seed}.log",
    message:
        "embed {wildcards.dataset} with the pretrained {wildcards.attention} model, seed {wildcards.seed}"


# The untrained baseline on the corpus vocabulary: the initial weights of the seed-0 pretraining
# runs (the same for every unit).
use rule embed_untrained as pretrain_embed_untrained with:
    input:
        tokens=rules.pretrain_tokenize.output.tokens,
    output:
        embedding="results/pretrain/{dataset}/embed/untrained_{attention}.npz",
    wildcard_constraints:
        dataset=UNIT_WILDCARD,
    benchmark:
        "results/benchmarks/pretrain_embed_untrained/{dataset}/{attention}.tsv"
    log:
        "results/logs/pretrain/{dataset}/embed/untrained_{attention}.log",
    message:
        "embed {wildcards.dataset}: untrained {wildcards.attention} encoder, corpus vocabulary"


# PCA of a holdout side's test cells (a whole dataset's is the per-dataset protocol's file).
use rule pca as pretrain_pca with:
    input:
        prepared=rules.pretrain_holdout.output.selected,
    output:
        embedding="results/pretrain/{dataset}/embed/pca.npz",
    wildcard_constraints:
        dataset=UNIT_WILDCARD,
    benchmark:
        "results/benchmarks/pretrain_pca/{dataset}.tsv"
    log:
        "results/logs/pretrain/{dataset}/embed/pca.log",
    message:
        "PCA baseline of {wildcards.dataset}"


use rule evaluate as pretrain_evaluate with:
    input:
        prepared=unit_prepared,
        embeddings=unit_embeddings,
    output:
        metrics="results/pretrain/{dataset}/metrics.csv",
        umap="results/pretrain/{dataset}/umap.csv",
    wildcard_constraints:
        dataset=UNIT_WILDCARD,
    benchmark:
        "results/benchmarks/pretrain_evaluate/{dataset}.tsv"
    log:
        "results/logs/pretrain/{dataset}/evaluate.log",
    message:
        "evaluate {wildcards.dataset}: every pretrained model's embedding and the baselines"


# The per-dataset protocol's statistics, per role: corpus datasets, zero-shot datasets.
use rule aggregate as pretrain_aggregate with:
    input:
        metrics=role_metrics,
    output:
        table="results/pretrain/tables/{role}/representation.csv",
        summary_csv=report(
            "results/pretrain/tables/{role}/representation_summary.csv",
            caption="../report/representation_summary.rst",
            category="Tables",
            subcategory="Pretraining",
        ),
        summary_md="results/pretrain/tables/{role}/representation_summary.md",
        summary_tex="results/pretrain/tables/{role}/representation_summary.tex",
        training_csv="results/pretrain/tables/{role}/representation_training.csv",
    wildcard_constraints:
        role="corpus|zero_shot",
    benchmark:
        "results/benchmarks/pretrain_aggregate/{role}.tsv"
    log:
        "results/logs/pretrain/aggregate_{role}.log",
    message:
        "aggregate: pretraining protocol, {wildcards.role} datasets"


rule pretrain_match_rates:
    input:
        rates=expand("results/pretrain/{dataset}/match.json", dataset=list(PRETRAIN_UNITS)),
        corpus=rules.pretrain_vocabulary.output.table,
    output:
        table="results/pretrain/tables/match_rates.csv",
    benchmark:
        "results/benchmarks/pretrain_match_rates/match_rates.tsv"
    log:
        "results/logs/pretrain/match_rates.log",
    conda:
        "../../envs/sigmoid-sc.yaml"
    threads: 1
    params:
        units=pretrain_units_json(),
    message:
        "pretraining protocol: match rates with the corpus vocabulary"
    shell:
        "python -m sigmoid_sc.cli match-rates --rates {input.rates:q} --units-json {params.units:q}"
        " --corpus {input.corpus:q} --output {output.table:q} > {log:q} 2>&1"


# The protocols side by side: every group's tables with protocol, role and source columns.
rule protocols:
    input:
        tables=[group[1] for group in protocol_groups()],
        summaries=[group[2] for group in protocol_groups()],
        markdowns=[group[3] for group in protocol_groups()],
        match_rates=rules.pretrain_match_rates.output.table,
    output:
        table="results/tables/representation_protocols.csv",
        summary_csv=report(
            "results/tables/representation_protocols_summary.csv",
            caption="../report/representation_protocols.rst",
            category="Tables",
        ),
        summary_md="results/tables/representation_protocols_summary.md",
    benchmark:
        "results/benchmarks/protocols/protocols.tsv"
    log:
        "results/logs/aggregate/protocols.log",
    conda:
        "../../envs/sigmoid-sc.yaml"
    threads: 1
    params:
        groups=[group[0] for group in protocol_groups()],
        sources=pretrain_sources_json(),
        aggregate=section_json("aggregate"),
    message:
        "protocols side by side: {params.groups}"
    shell:
        "python -m sigmoid_sc.cli protocols --groups {params.groups:q} --tables {input.tables:q}"
        " --summaries {input.summaries:q} --markdowns {input.markdowns:q}"
        " --params-json {params.aggregate:q} --sources-json {params.sources:q}"
        " --match-rates {input.match_rates:q} --table {output.table:q}"
        " --summary-csv {output.summary_csv:q} --summary-md {output.summary_md:q} > {log:q} 2>&1"


use rule figure_metrics as pretrain_figure_metrics with:
    input:
        table=rules.pretrain_aggregate.output.table,
    output:
        png=report(
            "results/pretrain/figures/metrics_{role}.png",
            caption="../report/metrics.rst",
            category="Figures",
            subcategory="Pretraining",
            labels={"role": "{role}", "figure": "metrics"},
        ),
        pdf="results/pretrain/figures/metrics_{role}.pdf",
    wildcard_constraints:
        role="corpus|zero_shot",
    benchmark:
        "results/benchmarks/pretrain_figure_metrics/{role}.tsv"
    log:
        "results/logs/pretrain/figures/metrics_{role}.log",
    message:
        "figure: metrics of the pretraining protocol's {wildcards.role} datasets"


# The pretraining runs' loss curves; the embeddings of the first corpus unit carry each run's
# attention and seed (from the model's record).
use rule figure_loss as pretrain_figure_loss with:
    input:
        histories=pretrain_histories(),
        embeddings=pretrain_run_embeddings(CORPUS_UNITS[0]) if CORPUS_UNITS else [],
    output:
        png=report(
            "results/pretrain/figures/loss_{dataset}.png",
            caption="../report/loss.rst",
            category="Figures",
            subcategory="Pretraining",
            labels={"dataset": "{dataset}", "figure": "loss curves"},
        ),
        pdf="results/pretrain/figures/loss_{dataset}.pdf",
    wildcard_constraints:
        dataset="corpus",
    benchmark:
        "results/benchmarks/pretrain_figure_loss/{dataset}.tsv"
    log:
        "results/logs/pretrain/figures/loss_{dataset}.log",
    message:
        "figure: loss curves of the pretraining runs"


use rule figure_umap as pretrain_figure_umap with:
    input:
        umap=rules.pretrain_evaluate.output.umap,
        metrics=rules.pretrain_evaluate.output.metrics,
    output:
        png=report(
            "results/pretrain/figures/umap_{dataset}.png",
            caption="../report/umap.rst",
            category="Figures",
            subcategory="Pretraining",
            labels={"dataset": "{dataset} (pretrained)", "figure": "UMAP"},
        ),
        pdf="results/pretrain/figures/umap_{dataset}.pdf",
    wildcard_constraints:
        dataset=UNIT_WILDCARD,
    benchmark:
        "results/benchmarks/pretrain_figure_umap/{dataset}.tsv"
    log:
        "results/logs/pretrain/figures/umap_{dataset}.log",
    message:
        "figure: UMAPs of {wildcards.dataset}, pretrained models"


# Targets that split the protocol between machines: `pretrain_tokens` (CPU: data to tokens)
# and `pretrain_models` (GPU: corpus tokens, training, embeddings; from the tokens alone with
# --allowed-rules pretrain_corpus pretrain_train pretrain_embed pretrain_embed_untrained
# pretrain_models).
rule pretrain_tokens:
    localrule: True
    input:
        pretrain_tokens(),


rule pretrain_models:
    localrule: True
    input:
        pretrain_embeddings(),
