"""The LoRA paper's sec. 7 on the `bench methods` adapters (Wq, Wv at r = 4, 8, 64, trained
to convergence), as a JSON-able dict, and its tables and figures rendered from that dict (so
`--from-json` redraws them without the adapters).

- Figure 3: phi(A_r=8, A_r=64, i, j), i <= 8, j <= 64, per adapted module.
- Figure 4: phi(A_r=64 seed 0, A_r=64 seed 1, i, j), i, j <= 64.
  Both beside the same statistic for two Gaussian random matrices of the same shapes.
- Table 7: ||U^T W V^T||_F with U, V the top-r singular directions of dW ("dW"), of W itself
  ("W") and of a random matrix ("random"), with ||W||_F and ||dW||_F, for r = 4 and r = 64.
"""
from __future__ import annotations

from pathlib import Path

PAIRS = {"fig3": ("r=8", "r=64", "phi(A_r=8, A_r=64, i, j)"),
         "fig4": ("r=64", "r=64 seed 1", "phi(A_r=64 seed 0, A_r=64 seed 1, i, j)")}
TABLE7 = ("r=4", "r=64")


def _round(grid) -> list[list[float]]:
    return [[round(float(v), 4) for v in row] for row in grid]


def compute(artifacts: dict[str, Path], base: str | Path, seed: int = 0) -> dict:
    """The analyses from the adapter folders {"r=4": path, "r=8": ..., "r=64": ...,
    "r=64 seed 1": ...} over the base model folder `base`."""
    import torch

    from lorafleet.analysis.report import (analyze_adapter, base_weights_for, compare_adapters,
                                           load_lora_factors)
    from lorafleet.analysis.subspace import subspace_similarity_grid
    from lorafleet.models import load_model

    factors = {name: load_lora_factors(path) for name, path in artifacts.items()}
    gen = torch.Generator().manual_seed(seed)
    out: dict = {"phi": {}, "phi_random": {}, "table7": [], "spectra": {}}
    for fig, (first, second, _) in PAIRS.items():
        pair = compare_adapters(factors[first], factors[second])
        out["phi"][fig] = {m: _round(g) for m, g in pair.grids.items()}
        a1 = next(iter(factors[first].values())).lora_a
        a2 = next(iter(factors[second].values())).lora_a
        rand = subspace_similarity_grid(torch.randn(a1.shape, generator=gen, dtype=torch.float64),
                                        torch.randn(a2.shape, generator=gen, dtype=torch.float64))
        out["phi_random"][fig] = _round(rand)
    model = load_model(base)
    for name in TABLE7:
        rows = analyze_adapter(factors[name], base_weights_for(model, factors[name]), seed=seed)
        for m in rows:
            out["table7"].append({"adapter": name, "module": m.module, "r": m.rank,
                                  "dw_dirs": m.weight_projection_norm,
                                  "w_dirs": m.own_projection_norm,
                                  "random_dirs": m.random_directions_norm,
                                  "w_norm": m.weight_norm, "dw_norm": m.delta_norm,
                                  "amplification": m.amplification})
        out["spectra"][name] = {m.module: [round(v, 6) for v in m.singular_values] for m in rows}
    return out


def _short(module: str) -> str:
    return module.replace("model.layers.", "L").replace(".self_attn.", " ").replace("_proj", "")


def figures(sec7: dict, folder: Path) -> list[str]:
    """Write the PNGs; returns their file names."""
    import torch

    from lorafleet.analysis import plots

    names = []
    for fig, (_, _, title) in PAIRS.items():
        grids = {_short(m): torch.tensor(g) for m, g in sec7["phi"][fig].items()}
        grids["random Gaussian"] = torch.tensor(sec7["phi_random"][fig])
        png = f"methods_phi_{fig}.png"
        plots.phi_heatmaps(grids, folder / png, title=title, max_panels=12)
        names.append(png)
    for name in TABLE7:
        png = f"methods_spectra_{name.replace('=', '')}.png"
        plots.spectra({_short(m): sv for m, sv in sec7["spectra"][name].items()}, folder / png,
                      title=f"dW singular values, LoRA Wq,Wv {name}")
        names.append(png)
    return names


def _mean(grid, i: int, j: int) -> float:
    cells = [v for row in grid[:i] for v in row[:j]]
    return sum(cells) / len(cells)


def tables(sec7: dict, figure_names: list[str], figure_dir: str) -> list[str]:
    lines = ["| figure | module | phi(1,1) | mean phi, i,j <= 8 | mean phi, all i, j |",
             "|---|---|---:|---:|---:|"]
    for fig, (_, _, title) in PAIRS.items():
        rows = list(sec7["phi"][fig].items()) + [("random Gaussian", sec7["phi_random"][fig])]
        for module, grid in rows:
            lines.append(f"| {fig}: {title} | {_short(module)} | {grid[0][0]:.3f} | "
                         f"{_mean(grid, 8, 8):.3f} | {_mean(grid, len(grid), len(grid[0])):.3f} |")
    lines += ["", "Figures: " + ", ".join(f"![{n}]({figure_dir}/{n})" for n in figure_names), "",
              "**Table 7** (‖UᵀWVᵀ‖_F with U, V the top-r singular directions of dW, of W "
              "itself, or of a random matrix):", "",
              "| adapter | module | dW dirs | W dirs | random dirs | ‖W‖_F | ‖dW‖_F | "
              "amplification ‖dW‖ / ‖UᵀWVᵀ‖ (dW dirs) |",
              "|---|---|---:|---:|---:|---:|---:|---:|"]
    for t in sec7["table7"]:
        lines.append(f"| {t['adapter']} | {_short(t['module'])} | {t['dw_dirs']:.3f} | "
                     f"{t['w_dirs']:.3f} | {t['random_dirs']:.3f} | {t['w_norm']:.2f} | "
                     f"{t['dw_norm']:.3f} | {t['amplification']:.2f} |")
    return lines
