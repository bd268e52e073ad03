"""`lorafleet bench NAME`: run one benchmark program from `lorafleet.bench`."""
from __future__ import annotations

import functools
import importlib

from lorafleet.cli.progress import (add_progress_argument, progress_factory,
                                    quiet_library_bars)

# name -> one-line description; the module is lorafleet.bench.<name>
BENCHMARKS = {
    "roofline": "the machine's matmul rate (bf16, fp32) and memory bandwidth",
    "model": "forward and generation speed vs transformers on the same checkpoint",
    "quant": "NF4 quantize / dequantize / 4-bit linear vs bitsandbytes and bf16",
    "train": "LoRA vs full fine-tuning memory and step time; our LoRA step vs PEFT",
    "serve": "S-LoRA workload: throughput vs number of adapters, vs baselines",
    "serve_tp": "tensor-parallel serving: N ranks vs one process, communication time and volume "
                "(also `bench serve --tensor-parallel-size N`)",
    "kernels": "the engine's CPU kernels (batched LoRA, decode attention, packed weights) vs "
               "the torch paths they replace",
    "pretraining": "the embedded base's pretraining curve, from its committed log "
                   "(docs/paper.md)",
    "methods": "the LoRA paper's studies at small scale: methods, ranks, matrices, sec. 7 "
               "(3 seeds, t intervals; writes docs/paper.md)",
    "inits": "LoRA initializations (pissa, olora, loftq) vs the default: convergence",
    "dtypes": "QLoRA's data types: NF4 vs FP4 vs Int4 error and perplexity (docs/paper.md)",
    "efficiency": "LoRA paper Table 1: forward latency of merged/unmerged LoRA and adapter "
                  "layers vs the base; checkpoint sizes (docs/paper.md)",
}


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser("bench", help="run a benchmark (prints a table, writes JSON)")
    names = parser.add_subparsers(dest="benchmark", metavar="NAME")
    for name, description in BENCHMARKS.items():
        try:
            module = importlib.import_module(f"lorafleet.bench.{name}")
        except ModuleNotFoundError as exc:
            if exc.name == f"lorafleet.bench.{name}":
                continue
            raise
        sub = names.add_parser(name, help=description, description=description)
        module.add_arguments(sub)
        if "--no-progress" not in sub._option_string_actions:
            add_progress_argument(sub)
        sub.set_defaults(func=functools.partial(_run, module.run))


def _run(run, args) -> int:
    # Bars are the CLI's: the benchmark asks for one through args.progress when it loads a model
    # or starts its runs (lorafleet.bench.progress_for); run as `python -m` it draws none.
    args.progress = progress_factory(args)
    quiet_library_bars(args)
    return run(args)
