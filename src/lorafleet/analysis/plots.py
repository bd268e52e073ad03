"""PNG figures for the sec. 7 analyses (matplotlib, Agg backend: no display needed)."""
from __future__ import annotations

from pathlib import Path

import torch


def _pyplot():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def phi_heatmaps(grids: dict[str, torch.Tensor], path: str | Path, title: str = "",
                 max_panels: int = 8) -> Path:
    """One heat map per module of phi(A1, A2, i, j), i down, j across (the paper's Fig. 3)."""
    plt = _pyplot()
    names = list(grids)[:max_panels]
    cols = min(4, len(names))
    rows = (len(names) + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, 2.8 * rows), squeeze=False)
    for ax, name in zip(axes.flat, names):
        grid = grids[name].numpy()
        im = ax.imshow(grid, vmin=0.0, vmax=1.0, cmap="viridis", aspect="auto",
                       extent=(0.5, grid.shape[1] + 0.5, grid.shape[0] + 0.5, 0.5))
        ax.set_title(name.replace("model.layers.", "L").replace("self_attn.", ""), fontsize=8)
        ax.set_xlabel("j", fontsize=8)
        ax.set_ylabel("i", fontsize=8)
        ax.tick_params(labelsize=7)
    for ax in list(axes.flat)[len(names):]:
        ax.axis("off")
    fig.colorbar(im, ax=axes, shrink=0.8, label="phi")
    if title:
        fig.suptitle(title, fontsize=10)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def spectra(values: dict[str, list[float]], path: str | Path, title: str = "") -> Path:
    """Singular values of dW per module, normalised by the largest, on a log scale."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(5.5, 3.5))
    for name, sv in values.items():
        top = sv[0] if sv and sv[0] > 0 else 1.0
        ax.semilogy(range(1, len(sv) + 1), [v / top for v in sv], marker=".", label=name)
    ax.set_xlabel("singular value index")
    ax.set_ylabel("sigma_k / sigma_1")
    if len(values) <= 8:
        ax.legend(fontsize=6)
    if title:
        ax.set_title(title, fontsize=10)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
