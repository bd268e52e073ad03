"""`lorafleet adapters inspect DIR [--json]`: what a PEFT adapter folder holds.
`lorafleet adapters combine DIR DIR... --weights W W... --type svd --out DIR`: several adapters
into one new PEFT folder (PEFT's add_weighted_adapter; lora/combine.py)."""
from __future__ import annotations

import json


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser("adapters", help="inspect PEFT adapter folders")
    actions = parser.add_subparsers(dest="action", metavar="ACTION", required=True)
    inspect = actions.add_parser("inspect", help="rank, alpha, targets, parameters, size")
    inspect.add_argument("path", metavar="DIR", help="a PEFT adapter folder")
    inspect.add_argument("--json", action="store_true", help="print JSON for machines")
    inspect.set_defaults(func=run_inspect)

    combine = actions.add_parser("combine", help="combine adapters into a new PEFT folder "
                                 "(linear, cat, svd, ties, dare_linear, dare_ties, "
                                 "magnitude_prune; PEFT's add_weighted_adapter)")
    combine.add_argument("paths", metavar="DIR", nargs="+", help="PEFT adapter folders")
    combine.add_argument("--weights", type=float, nargs="+", default=None, metavar="W",
                         help="one weight per adapter (default: 1 each); may be negative")
    combine.add_argument("--type", dest="combination_type", choices=COMBINATION_TYPES,
                         default="svd", help="combination method (default: svd)")
    combine.add_argument("--out", required=True, metavar="DIR", help="new adapter folder")
    combine.add_argument("--svd-rank", type=int, default=None,
                         help="rank of an svd result (default: the largest input rank)")
    combine.add_argument("--svd-clamp", type=float, default=None,
                         help="quantile at which to clamp the svd factors")
    combine.add_argument("--density", type=float, default=None,
                         help="fraction of values kept by ties / dare / magnitude_prune")
    combine.add_argument("--majority-sign-method", choices=["total", "frequency"],
                         default="total", help="TIES sign election (default: total)")
    combine.add_argument("--seed", type=int, default=None,
                         help="torch seed for DARE's random masks")
    combine.set_defaults(func=run_combine)


# lorafleet.lora.combine.COMBINATION_TYPES, spelled out so that building the parser does not
# import torch (a test checks they agree).
COMBINATION_TYPES = ("linear", "ties", "dare_linear", "dare_ties", "magnitude_prune", "cat", "svd",
                     "ties_svd", "dare_linear_svd", "dare_ties_svd", "magnitude_prune_svd")


def run_combine(args) -> int:
    import torch

    from lorafleet.errors import ConfigError
    from lorafleet.lora.combine import combine_folders

    # adapters are named by their paths in errors (the index added when a path repeats)
    names = [p if args.paths.count(p) == 1 else f"{p}#{i}" for i, p in enumerate(args.paths)]
    weights = args.weights if args.weights is not None else [1.0] * len(names)
    if len(weights) != len(names):
        raise ConfigError(f"--weights: expected one weight per adapter ({len(names)}), found "
                          f"{len(weights)}")
    if args.seed is not None:
        torch.manual_seed(args.seed)
    out = combine_folders(dict(zip(names, args.paths)), weights, args.out,
                          args.combination_type, svd_rank=args.svd_rank,
                          svd_clamp=args.svd_clamp, density=args.density,
                          majority_sign_method=args.majority_sign_method)
    print(f"combined {len(names)} adapters ({args.combination_type}) -> {out}")
    return 0


def _size(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024


def run_inspect(args) -> int:
    from lorafleet.lora.peft_format import inspect_adapter

    info = inspect_adapter(args.path)
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    scaling = "alpha/sqrt(r) (rsLoRA)" if info["use_rslora"] else "alpha/r"
    rows = [
        ("adapter", info["path"]),
        ("base model", info["base_model_name_or_path"] or "-"),
        ("rank r", f"{info['r']}" + (f"  (patterns: {info['rank_pattern']})" if info["rank_pattern"] else "")),
        ("lora_alpha", f"{info['lora_alpha']}" + (f"  (patterns: {info['alpha_pattern']})" if info["alpha_pattern"] else "")),
        ("scaling", scaling),
        ("use_dora", info["use_dora"]),
        ("target_modules", info["target_modules"]),
        ("adapted", f"{info['adapted_modules']} modules: {', '.join(info['module_types'])}"),
        ("ranks found", ", ".join(map(str, info["ranks"]))),
        ("bias", info["bias"]),
        ("modules_to_save", info["modules_to_save"] or "-"),
        ("parameters", f"{info['parameters']:,} ({', '.join(info['dtypes'])})"),
        ("size on disk", _size(info["size_bytes"])),
    ]
    width = max(len(k) for k, _ in rows)
    for key, value in rows:
        print(f"{key:<{width}}  {value}")
    return 0
