"""`lorafleet adapters inspect DIR [--json]`: what a PEFT adapter folder holds."""
from __future__ import annotations

import json


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser("adapters", help="inspect PEFT adapter folders")
    actions = parser.add_subparsers(dest="action", metavar="ACTION", required=True)
    inspect = actions.add_parser("inspect", help="rank, alpha, targets, parameters, size")
    inspect.add_argument("path", metavar="DIR", help="a PEFT adapter folder")
    inspect.add_argument("--json", action="store_true", help="print JSON for machines")
    inspect.set_defaults(func=run_inspect)


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
