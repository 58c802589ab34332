"""Figures (matplotlib, Agg backend; PNG or SVG from the file name): precision-recall curves,
attention maps of a window with genes labelled and operons marked, a layers x heads grid, and an
embedding map (PCA, or UMAP when umap-learn is installed) coloured by a label."""
from __future__ import annotations

import pathlib
from typing import Sequence

import numpy as np

from glm_jax import files
from glm_jax.errors import InputError

FORMATS = ("png", "svg")


def _figure(*args, **kwargs):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt.subplots(*args, **kwargs)


def _save(figure, path: str | pathlib.Path) -> pathlib.Path:
    import matplotlib.pyplot as plt

    path = pathlib.Path(path)
    fmt = path.suffix.lstrip(".").lower()
    if fmt not in FORMATS:
        raise InputError(f"{path}: plots are written as {' or '.join(FORMATS)} (from the file name)")
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        return files.atomic_write(path, lambda handle: figure.savefig(handle, format=fmt, dpi=110, bbox_inches="tight"))
    finally:
        plt.close(figure)


def pr_curves(labels: np.ndarray, scores: dict[str, np.ndarray], path: str | pathlib.Path, title: str = "") -> pathlib.Path:
    """Precision-recall curve of every score against binary `labels`, AP in the legend."""
    from sklearn.metrics import average_precision_score, precision_recall_curve

    figure, axis = _figure(figsize=(5, 4.2))
    for name, score in scores.items():
        precision, recall, _ = precision_recall_curve(labels, score)
        axis.step(recall, precision, where="post", label=f"{name} (AP {average_precision_score(labels, score):.3f})")
    axis.axhline(float(np.mean(labels)), color="grey", lw=0.8, ls=":", label=f"chance ({np.mean(labels):.3f})")
    axis.set(xlabel="recall", ylabel="precision", xlim=(0, 1), ylim=(0, 1.02), title=title)
    axis.legend(fontsize=7, loc="lower left")
    return _save(figure, path)


def _operon_spans(operon_ids: Sequence[str]) -> list[tuple[int, int]]:
    """[first, last] positions of every run of >= 2 neighbouring genes with the same non-empty id."""
    spans, start = [], 0
    for i in range(1, len(operon_ids) + 1):
        if i == len(operon_ids) or not operon_ids[i] or operon_ids[i] != operon_ids[start]:
            if operon_ids[start] and i - start >= 2:
                spans.append((start, i - 1))
            start = i
    return spans


def _draw_map(axis, matrix: np.ndarray, names: Sequence[str] | None, operon_ids: Sequence[str] | None, title: str,
              small: bool = False):
    from matplotlib.patches import Rectangle

    image = axis.imshow(matrix, cmap="viridis", vmin=0.0, interpolation="nearest")
    for first, last in _operon_spans(operon_ids) if operon_ids is not None else ():
        axis.add_patch(Rectangle((first - 0.5, first - 0.5), last - first + 1, last - first + 1, fill=False,
                                 edgecolor="red", lw=0.8 if small else 1.4))
    if names is not None and not small:
        ticks = np.arange(len(names))
        axis.set_xticks(ticks, names, rotation=90, fontsize=6)
        axis.set_yticks(ticks, names, fontsize=6)
    else:
        axis.set_xticks([])
        axis.set_yticks([])
    axis.set_title(title, fontsize=6 if small else 9)
    return image


def attention_map(attention: np.ndarray, path: str | pathlib.Path, *, names: Sequence[str] | None = None,
                  operon_ids: Sequence[str] | None = None, title: str = "") -> pathlib.Path:
    """One attention matrix [genes, genes] (rows attend to columns), genes labelled on both axes,
    operons (runs of neighbours sharing an id) outlined in red."""
    attention = np.asarray(attention, np.float32)
    if attention.ndim != 2 or attention.shape[0] != attention.shape[1]:
        raise InputError(f"an attention map is [genes, genes], got {list(attention.shape)}")
    size = 2.5 + 0.22 * attention.shape[0]
    figure, axis = _figure(figsize=(size + 0.8, size))
    image = _draw_map(axis, attention, names, operon_ids, title)
    figure.colorbar(image, ax=axis, fraction=0.046, pad=0.04, label="attention")
    return _save(figure, path)


def attention_grid(attentions: np.ndarray, path: str | pathlib.Path, *, layers: Sequence[int] | None = None,
                   heads: Sequence[int] | None = None, operon_ids: Sequence[str] | None = None,
                   title: str = "") -> pathlib.Path:
    """attentions [layers, heads, genes, genes] as a grid, one row per selected layer and one
    column per selected head (default: all), operons outlined."""
    attentions = np.asarray(attentions, np.float32)
    if attentions.ndim != 4:
        raise InputError(f"attentions must be [layers, heads, genes, genes], got {list(attentions.shape)}")
    layers = list(range(attentions.shape[0])) if layers is None else list(layers)
    heads = list(range(attentions.shape[1])) if heads is None else list(heads)
    figure, axes = _figure(len(layers), len(heads), figsize=(1.3 * len(heads) + 0.5, 1.3 * len(layers) + 0.6),
                           squeeze=False)
    for r, layer in enumerate(layers):
        for c, head in enumerate(heads):
            _draw_map(axes[r, c], attentions[layer, head], None, operon_ids, f"L{layer} H{head}", small=True)
    figure.suptitle(title, fontsize=9)
    return _save(figure, path)


def project_2d(vectors: np.ndarray, method: str = "pca") -> np.ndarray:
    """[n, d] -> [n, 2] by PCA (sklearn), or UMAP (umap-learn, when installed)."""
    if method == "umap":
        try:
            import umap
        except ImportError as error:
            raise InputError("--method umap needs the umap-learn package (not installed); use --method pca") from error
        return umap.UMAP(random_state=0).fit_transform(vectors)
    if method != "pca":
        raise InputError(f"unknown projection {method!r} (pca or umap)")
    from sklearn.decomposition import PCA

    return PCA(n_components=2, random_state=0).fit_transform(vectors)


def embedding_map(vectors: np.ndarray, categories: Sequence[str], path: str | pathlib.Path, *, method: str = "pca",
                  title: str = "", max_categories: int = 12) -> pathlib.Path:
    """Scatter of [n, d] vectors projected to 2-D, coloured by category (the most frequent
    `max_categories` categories; the rest grey as "other")."""
    import matplotlib
    import pandas as pd

    points = project_2d(np.asarray(vectors, np.float32), method)
    categories = pd.Series(list(categories), dtype=object).fillna("(none)").astype(str)
    shown = categories.value_counts().index[:max_categories]
    figure, axis = _figure(figsize=(6.5, 4.8))
    rest = ~categories.isin(shown).to_numpy()
    if rest.any():
        axis.scatter(*points[rest].T, s=4, c="lightgrey", label="other")
    colours = matplotlib.colormaps["tab20"]
    for i, category in enumerate(shown):
        picked = (categories == category).to_numpy()
        axis.scatter(*points[picked].T, s=5, color=colours(i % 20), label=f"{category} ({picked.sum()})")
    axis.set(xlabel=f"{method.upper()} 1", ylabel=f"{method.upper()} 2", title=title)
    axis.legend(fontsize=6, markerscale=2, loc="center left", bbox_to_anchor=(1.0, 0.5))
    return _save(figure, path)
