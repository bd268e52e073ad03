"""`lorafleet analyze`: the LoRA paper's sec. 7 analyses on one or two PEFT adapters."""
from __future__ import annotations

import json
from pathlib import Path


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "analyze", help="subspace similarity, dW spectra and amplification of PEFT adapters")
    p.add_argument("adapter", type=Path, help="a PEFT adapter folder")
    p.add_argument("other", type=Path, nargs="?", help="a second adapter over the same base: "
                   "phi(A1, A2, i, j) heat maps")
    p.add_argument("--base", type=Path, default=None,
                   help="the base model folder (for the amplification factor)")
    p.add_argument("--out", type=Path, default=Path("out/analysis"), help="PNG/JSON folder")
    p.add_argument("--json", action="store_true", help="also print the results as JSON")
    p.set_defaults(func=run)


def run(args) -> int:
    from lorafleet.analysis import plots
    from lorafleet.analysis.report import (analyze_adapter, base_weights_for, compare_adapters,
                                           load_lora_factors)

    first = load_lora_factors(args.adapter)
    weights = None
    if args.base is not None:
        from lorafleet.models import load_model
        weights = base_weights_for(load_model(args.base), first)
    modules = analyze_adapter(first, weights)
    args.out.mkdir(parents=True, exist_ok=True)
    print(f"{args.adapter}: {len(modules)} adapted modules")
    print(f"{'module':44s} {'r':>3s} {'||dW||_F':>9s} {'sv1/sv_r':>9s} {'amplif.':>8s} "
          f"{'||UtWVt||':>9s} {'random':>8s}")
    for m in modules:
        ratio = m.singular_values[0] / max(m.singular_values[-1], 1e-30)
        amp = f"{m.amplification:8.2f}" if m.amplification is not None else f"{'-':>8s}"
        wp = f"{m.weight_projection_norm:9.4f}" if m.weight_projection_norm is not None else \
            f"{'-':>9s}"
        rp = f"{m.random_projection_norm:8.4f}" if m.random_projection_norm is not None else \
            f"{'-':>8s}"
        print(f"{m.module:44s} {m.rank:3d} {m.delta_norm:9.4f} {ratio:9.2f} {amp} {wp} {rp}")
    spectra_png = plots.spectra({m.module: m.singular_values for m in modules},
                                args.out / "spectra.png", title=f"dW spectra: {args.adapter.name}")
    print(f"wrote {spectra_png}")
    result = {"adapter": str(args.adapter), "modules": [vars(m) for m in modules]}
    if args.other is not None:
        pair = compare_adapters(first, load_lora_factors(args.other))
        print(f"\nphi(A1, A2, i, j) vs {args.other} (1 = same subspace, 0 = orthogonal)")
        print(f"{'module':44s} {'phi(1,1)':>9s} {'mean phi':>9s} {'shape':>8s}")
        for name, grid in pair.grids.items():
            print(f"{name:44s} {grid[0, 0].item():9.3f} {grid.mean().item():9.3f} "
                  f"{grid.shape[0]:>3d}x{grid.shape[1]:<4d}")
        png = plots.phi_heatmaps(pair.grids, args.out / "subspace_similarity.png",
                                 title=f"phi({args.adapter.name}, {args.other.name}, i, j)")
        print(f"wrote {png}")
        result["phi"] = {name: grid.tolist() for name, grid in pair.grids.items()}
    (args.out / "analysis.json").write_text(json.dumps(result) + "\n")
    if args.json:
        print(json.dumps(result))
    return 0
