"""The seeded generator of the ``synthetic`` source: counts with known cell types and batches."""

from __future__ import annotations

import numpy as np
import pandas as pd
import scipy.sparse as sp

from .errors import ConfigError


def symbol_names(n_genes: int) -> list[str]:
    """Symbol-like gene names, the same for every seed: gene ``g`` is ``SX`` + letters + digit
    (``SXAA0``, ``SXAA1``, ..., ``SXAB0``, ...). Two synthetic datasets named this way share the
    names of their first ``min(n_genes)`` genes (not their roles: each seed draws its own
    programmes), as two real datasets share gene symbols."""
    names = []
    for g in range(n_genes):
        block, letters = g // 10, ""
        for _ in range(2):
            block, letter = divmod(block, 26)
            letters = chr(ord("A") + letter) + letters
        while block:
            block, letter = divmod(block, 26)
            letters = chr(ord("A") + letter) + letters
        names.append(f"SX{letters}{g % 10}")
    return names


def synthetic_counts(
    n_cells: int = 1500,
    n_genes: int = 600,
    n_cell_types: int = 6,
    n_batches: int = 2,
    seed: int = 0,
    gene_names: str = "index",
    label_key: str = "cell_type",
    batch_key: str = "batch",
):
    """Seeded UMI-like counts with known cell types and batches.

    Model (a gamma-Poisson, i.e. negative binomial, per gene and cell):

    - baseline gene proportions are log-normal (a few genes dominate, many are rare) and the
      median library is ~0.6 counts per gene, so about two thirds of the matrix is zero;
    - each cell type has its own gene programme: a disjoint block of marker genes (1/20 of the
      genes) up-regulated about 5x (log-fold change ~N(1.6, 0.4)) and half as many genes
      down-regulated (~N(-1.0, 0.3)), so types differ in which genes lead the ranking. The strength
      is chosen so that PCA separates the types well but not perfectly (k-means NMI ~0.7 at the
      default sizes), leaving room for a model to do better or worse;
    - each batch multiplies every gene by a milder factor (log-fold change ~N(0, 0.25)) and shifts
      the library size, so batch is visible but weaker than type;
    - library sizes are log-normal (sd 0.5 on the natural-log scale), so cells express varied
      numbers of genes;
    - cell-type proportions are unequal (Dirichlet), every type has at least a few cells.

    Sizes as the config's schema allows them (``n_cells >= 2 * n_cell_types``,
    ``n_genes >= 4 * n_cell_types``; :mod:`sigmoid_sc.config` checks them). Returns an AnnData:
    ``X`` float32 CSR counts ``[n_cells, n_genes]``, ``obs[label_key]``
    ("type_0", ...) and ``obs[batch_key]`` ("batch_0", ...) as categoricals. Genes are named
    ``gene_00000``, ... (``gene_names: index``) or by :func:`symbol_names` (``symbols``); the
    names change nothing else.
    """
    import anndata as ad

    rng = np.random.default_rng(seed)

    # cell types: unequal proportions, at least 2 cells each
    proportions = rng.dirichlet(np.full(n_cell_types, 4.0))
    n_per_type = 2 + rng.multinomial(n_cells - 2 * n_cell_types, proportions)
    cell_type = rng.permutation(np.repeat(np.arange(n_cell_types), n_per_type))
    batch = rng.integers(0, n_batches, size=n_cells)

    # baseline log-expression per gene
    log_base = rng.normal(0.0, 1.3, size=n_genes)

    # gene programmes: disjoint marker blocks (about a tenth of the genes per type, at most half
    # of all genes overall), plus a few down-regulated genes taken from the remaining genes
    lfc = np.zeros((n_cell_types, n_genes))
    order = rng.permutation(n_genes)
    n_markers = max(3, min(n_genes // 20, n_genes // (2 * n_cell_types)))
    rest = order[n_cell_types * n_markers :]
    for t in range(n_cell_types):
        markers = order[t * n_markers : (t + 1) * n_markers]
        lfc[t, markers] = rng.normal(1.6, 0.4, size=n_markers)
        down = rng.choice(rest, size=min(len(rest), n_markers // 2), replace=False)
        lfc[t, down] -= rng.normal(1.0, 0.3, size=len(down))

    batch_lfc = rng.normal(0.0, 0.25, size=(n_batches, n_genes))
    batch_lib = rng.normal(0.0, 0.15, size=n_batches)

    log_mean = log_base[None, :] + lfc[cell_type] + batch_lfc[batch]
    proportion = np.exp(log_mean - log_mean.max(axis=1, keepdims=True))
    proportion /= proportion.sum(axis=1, keepdims=True)
    # median library ~ 0.6 counts per gene, enough for a few hundred expressed genes per cell
    library = np.exp(rng.normal(np.log(0.6 * n_genes), 0.5, size=n_cells) + batch_lib[batch])
    mean = proportion * library[:, None]
    dispersion = 0.2  # NB variance = mean + dispersion * mean^2
    rate = rng.gamma(shape=1.0 / dispersion, scale=mean * dispersion)
    counts = rng.poisson(rate).astype(np.float32)

    # a cell drawn with no counts at all would be an invalid droplet: give it its top gene
    empty = counts.sum(axis=1) == 0
    counts[empty, np.argmax(mean[empty], axis=1)] = 1.0

    obs = pd.DataFrame(
        {
            label_key: pd.Categorical([f"type_{t}" for t in cell_type]),
            batch_key: pd.Categorical([f"batch_{b}" for b in batch]),
        },
        index=pd.Index([f"cell_{i:06d}" for i in range(n_cells)]),
    )
    if gene_names == "symbols":
        names = symbol_names(n_genes)
    elif gene_names == "index":
        names = [f"gene_{g:05d}" for g in range(n_genes)]
    else:
        raise ConfigError(f"synthetic.gene_names must be index or symbols; got {gene_names!r}")
    var = pd.DataFrame(index=pd.Index(names))
    return ad.AnnData(X=sp.csr_matrix(counts), obs=obs, var=var)
