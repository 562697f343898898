# Helpers of the pretraining protocol (workflow/rules/pretrain.smk): which protocols run, the
# units (sets of scored cells) under results/pretrain/, and their inputs. sigmoid_sc.config
# read the config and checked the units before any job (errors name the key).

PROTOCOLS = sigmoid_sc_config.protocols(config)
PRETRAIN = "pretrain" in PROTOCOLS
PRETRAIN_UNITS = (
    {u.name: u for u in sigmoid_sc_config.pretrain_units(config)} if PRETRAIN else {}
)
CORPUS_UNITS = [n for n, u in PRETRAIN_UNITS.items() if u.role == sigmoid_sc_config.CORPUS]
PRETRAIN_ROLES = [
    role
    for role in (sigmoid_sc_config.CORPUS, sigmoid_sc_config.ZERO_SHOT)
    if any(u.role == role for u in PRETRAIN_UNITS.values())
]
# the dataset wildcard of the pretraining rules: a unit ("corpus" for the pretraining runs)
UNIT_WILDCARD = "|".join(re.escape(n) for n in PRETRAIN_UNITS) or "(?!x)x"


def prepared_of_unit(name):
    """The unit's prepared cells: its own file for a holdout's side, else its dataset's."""
    unit = PRETRAIN_UNITS[name]
    if unit.selects:
        return f"results/pretrain/{unit.name}/selected.h5ad"
    return f"results/{unit.dataset}/prepared.h5ad"


def unit_prepared(wildcards):
    return prepared_of_unit(wildcards.dataset)


def unit_source_prepared(wildcards):
    return f"results/{PRETRAIN_UNITS[wildcards.dataset].dataset}/prepared.h5ad"


def unit_selection_json(wildcards):
    return json.dumps(PRETRAIN_UNITS[wildcards.dataset].selection(), sort_keys=True)


def unit_match_floor(wildcards):
    """The match-rate floor of a zero-shot unit. Corpus units make the vocabulary and match it
    by construction: no floor, so changing it retrains nothing."""
    if PRETRAIN_UNITS[wildcards.dataset].role == sigmoid_sc_config.CORPUS:
        return ""
    return f"--min-match-rate {config['pretrain']['min_match_rate']}"


def corpus_sampling_json():
    """The pretrain section without the floor, which the vocabulary does not read."""
    section = {k: v for k, v in config["pretrain"].items() if k != "min_match_rate"}
    return json.dumps(section, sort_keys=True)


def corpus_prepared():
    return [prepared_of_unit(name) for name in CORPUS_UNITS]


def corpus_tokens():
    return [f"results/pretrain/{name}/tokens.npz" for name in CORPUS_UNITS]


def pretrain_histories():
    return expand(
        "results/pretrain/corpus/train/{attention}_seed{seed}/history.csv",
        attention=ATTENTIONS,
        seed=SEEDS,
    )


def pretrain_run_embeddings(unit):
    """The unit's embedding by every pretrained model, in the order of pretrain_histories."""
    return expand(
        "results/pretrain/{dataset}/embed/{attention}_seed{seed}.npz",
        dataset=unit,
        attention=ATTENTIONS,
        seed=SEEDS,
    )


def unit_embeddings(wildcards):
    """Embeddings of the unit's test cells: every pretrained model, then the baselines (the
    untrained encoder of each kind on the corpus vocabulary, PCA; PCA is the per-dataset
    protocol's file where the unit is its whole dataset)."""
    unit = PRETRAIN_UNITS[wildcards.dataset]
    pca = (
        f"results/pretrain/{unit.name}/embed/pca.npz"
        if unit.selects
        else f"results/{unit.dataset}/embed/pca.npz"
    )
    untrained = expand(
        "results/pretrain/{dataset}/embed/untrained_{attention}.npz",
        dataset=unit.name,
        attention=ATTENTIONS,
    )
    return pretrain_run_embeddings(unit.name) + untrained + [pca]


def role_metrics(wildcards):
    return [
        f"results/pretrain/{name}/metrics.csv"
        for name, unit in PRETRAIN_UNITS.items()
        if unit.role == wildcards.role
    ]


def pretrain_units_json():
    return json.dumps(
        {n: {"dataset": u.dataset, "role": u.role} for n, u in PRETRAIN_UNITS.items()},
        sort_keys=True,
    )


def pretrain_sources_json():
    return json.dumps({n: u.dataset for n, u in PRETRAIN_UNITS.items()}, sort_keys=True)


def protocol_groups():
    """``(protocol:role, table, summary csv, summary md)`` of every group that runs."""
    groups = []
    if "per_dataset" in PROTOCOLS:
        groups.append(("per_dataset:own", "results/tables/representation"))
    for role in PRETRAIN_ROLES:
        groups.append((f"pretrain:{role}", f"results/pretrain/tables/{role}/representation"))
    return [(g, f"{p}.csv", f"{p}_summary.csv", f"{p}_summary.md") for g, p in groups]


def pretrain_embeddings():
    """What the GPU part of the protocol makes: every model's history and every embedding by
    an encoder (trained or not)."""
    return (
        pretrain_histories()
        + [path for unit in PRETRAIN_UNITS for path in pretrain_run_embeddings(unit)]
        + expand(
            "results/pretrain/{dataset}/embed/untrained_{attention}.npz",
            dataset=list(PRETRAIN_UNITS),
            attention=ATTENTIONS,
        )
    )


def pretrain_tokens():
    """What the GPU part needs: every unit's tokens, the vocabulary and the corpus' cells."""
    return [
        "results/pretrain/corpus/vocabulary.npz",
        "results/pretrain/corpus/cells.csv",
    ] + [f"results/pretrain/{name}/tokens.npz" for name in PRETRAIN_UNITS]


def protocol_targets():
    """The pretraining protocol's tables and figures, and the side-by-side tables."""
    if not PRETRAIN:
        return []
    return (
        expand(
            "results/pretrain/tables/{role}/representation{suffix}",
            role=PRETRAIN_ROLES,
            suffix=[".csv", "_summary.csv", "_summary.md", "_summary.tex", "_training.csv"],
        )
        + ["results/pretrain/tables/match_rates.csv"]
        + expand(
            "results/tables/representation_protocols{suffix}",
            suffix=[".csv", "_summary.csv", "_summary.md"],
        )
        + expand(
            "results/pretrain/figures/metrics_{role}.{ext}", role=PRETRAIN_ROLES, ext=["png", "pdf"]
        )
        + expand("results/pretrain/figures/loss_corpus.{ext}", ext=["png", "pdf"])
        + expand(
            "results/pretrain/figures/umap_{dataset}.{ext}",
            dataset=list(PRETRAIN_UNITS),
            ext=["png", "pdf"],
        )
    )
