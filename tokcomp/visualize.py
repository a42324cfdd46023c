"""Pictures of what merging did: each merged group of patches coloured, and tokens per layer."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from tokcomp.io import atomic_write


def group_image(view: Image.Image, source: np.ndarray, grid: tuple[int, int], seed: int = 0) -> np.ndarray:
    """RGB array of ``view`` with every multi-patch group tinted in its own colour and outlined."""
    h, w = grid
    ids = source.reshape(h, w)
    base = np.asarray(view.convert("RGB"), dtype=np.float32) / 255.0
    height, width = base.shape[:2]
    rows = (np.arange(height) * h) // height
    cols = (np.arange(width) * w) // width
    pixel_ids = ids[rows[:, None], cols[None, :]]
    counts = np.bincount(source, minlength=int(source.max()) + 1)
    palette = np.random.default_rng(seed).uniform(0.15, 1.0, size=(len(counts), 3))
    merged = counts[pixel_ids] > 1
    out = base.copy()
    out[merged] = 0.45 * base[merged] + 0.55 * palette[pixel_ids[merged]]
    edge = np.zeros_like(merged)
    edge[:-1, :] |= pixel_ids[:-1, :] != pixel_ids[1:, :]
    edge[:, :-1] |= pixel_ids[:, :-1] != pixel_ids[:, 1:]
    out[edge] = 0.0
    return (out * 255).round().astype(np.uint8)


def save_merge_figure(
    path: str | Path,
    view: Image.Image,
    source: np.ndarray,
    grid: tuple[int, int],
    layer_counts: list[int],
    feature_layer: int,
    title: str,
    unit: str = "patches",
) -> Path:
    """Three panels: the encoder's view, the merge map at the feature layer, tokens after each layer
    (``unit``: what the map's cells are, patches or a family's merge units)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    num_patches = grid[0] * grid[1]
    tokens = int(source.max()) + 1
    fig, axes = plt.subplots(1, 3, figsize=(13, 4.4), gridspec_kw={"width_ratios": [1, 1, 1.2]})
    axes[0].imshow(view)
    axes[0].set_title("encoder input")
    axes[1].imshow(group_image(view, source, grid))
    axes[1].set_title(f"{tokens} tokens of {num_patches} {unit} (groups coloured)")
    for ax in axes[:2]:
        ax.set_xticks([])
        ax.set_yticks([])
    layers = list(range(len(layer_counts) + 1))
    axes[2].plot(layers, [num_patches, *layer_counts], marker="o")
    axes[2].axvline(feature_layer, color="gray", linestyle="--", label=f"layer the VLM reads ({feature_layer})")
    axes[2].set_xlabel("encoder layer")
    axes[2].set_ylabel(f"tokens ({unit})")
    axes[2].set_ylim(0, num_patches * 1.05)
    axes[2].grid(alpha=0.3)
    axes[2].legend(loc="upper right")
    axes[2].set_title("tokens after each layer")
    fig.suptitle(title)
    fig.tight_layout()
    return save_png(fig, path)


def save_png(fig, path: str | Path) -> Path:
    """Write a matplotlib figure as PNG atomically, then close it."""
    import matplotlib.pyplot as plt

    def write(tmp: Path) -> None:
        fig.savefig(tmp, dpi=110, format="png")

    try:
        return atomic_write(path, write)
    finally:
        plt.close(fig)
