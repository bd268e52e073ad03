"""The LoRA paper's efficiency figures (issue 18 item 4), measured on this machine.

1. Inference latency, Table 1's shape (LoRA sec. 3 "Adapter layers introduce inference latency",
   appendix B): one forward pass of a random-weight model with GPT-2 medium's layer shape
   (hidden 1024, 16 heads, FFN 4096, vocab 50257), timed for the base, LoRA merged into the
   weights (`lora.unload`: the base's modules again), LoRA unmerged (the low-rank path beside
   each adapted projection), Adapter^H (Houlsby: after attention and after the FFN,
   `method adapter`) and Adapter^L (Lin: after the FFN only, with a LayerNorm,
   `adapter_variant="lin"`), at the paper's batch x sequence cells, a batch sweep at sequence
   128 (appendix B's axis) and short single sequences (the online regime). The variants run
   interleaved, the order rotating every round, so load from other processes hits all alike;
   the % over base is the median of the per-round ratios. With one torch thread (the default)
   the time is the thread's CPU time, so other jobs on a shared machine do not count in it
   (wall-clock is kept beside it in the JSON). The LM head (50257 x 1024) is left
   out: it adds the same time to every variant (its share of the FLOPs is in the JSON).
   The adapters' up-projections and LoRA's B are set non-zero, so every added module computes
   something (a test checks the outputs move).
2. Training step time and memory, LoRA vs full: measured by `lorafleet bench train`
   (docs/results/train_step_551m.json); read from there, not measured again.
3. Checkpoint size: PEFT adapters of the embedded base saved and measured on disk, against the
   base's safetensors; and the GPT-3 175B arithmetic (paper sec. 4.2: 350 GB -> 35 MB).
The machine's matmul roofline (fp32 and bf16 GFLOP/s) and copy bandwidth are measured in the
same run, before and after the latency study.

    lorafleet bench efficiency [--layers 2] [--threads 1] [--json docs/results/efficiency.json]
        [--figure docs/figures/efficiency_latency.png] [--paper docs/paper.md]
    lorafleet bench efficiency --from-json docs/results/efficiency.json --paper docs/paper.md
"""
from __future__ import annotations

import argparse
import copy
import json
import logging
import math
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch import nn

from lorafleet.bench.doc_block import markers
from lorafleet.bench.efficiency_report import PAPER_CELLS

log = logging.getLogger(__name__)

PAPER_BEGIN, PAPER_END = markers("efficiency")
# GPT-2 medium (Radford et al. 2019): the model of the paper's Table 1.
GPT2_MEDIUM = {"hidden": 1024, "heads": 16, "intermediate": 4096, "layers": 24, "vocab": 50257,
               "context": 1024}
# Table 1's columns (batch, sequence), appendix B's batch axis at sequence 128, and the online
# regime below the paper's shortest sequence, where per-module cost shows on a CPU.
CELLS = PAPER_CELLS + ((32, 128), (16, 128), (8, 128), (4, 128), (2, 128), (1, 16), (1, 1))
# GPT-3 175B (Brown et al. 2020, Table 2.1): 96 layers, d_model 12288, context 2048.
GPT3 = {"layers": 96, "d_model": 12288, "vocab": 50257, "context": 2048}
PAPER_GPT3 = {"checkpoint_gb": 350, "adapter_mb": 35, "train_vram_full_tb": 1.2,
              "train_vram_lora_gb": 350, "step_speedup": 0.25}
TRAIN_RESULTS = Path("docs/results/train_step_551m.json")


def variant_names(bottlenecks: list[int]) -> list[str]:
    return ["base", "lora_merged", "lora_unmerged"] + [
        f"adapter_{kind}{b}" for b in bottlenecks for kind in ("h", "l")]


# ---- the latency model ------------------------------------------------------------------------

def gpt2_shape_config(layers: int, hidden: int, heads: int, intermediate: int, vocab: int,
                      context: int):
    from lorafleet.models import ModelConfig
    return ModelConfig(architecture="GPT2LMHeadModel", vocab_size=vocab, hidden_size=hidden,
                       intermediate_size=intermediate, num_hidden_layers=layers,
                       num_attention_heads=heads, num_key_value_heads=heads,
                       max_position_embeddings=context, hidden_act="gelu_new", norm_eps=1e-5,
                       tie_word_embeddings=True)


@torch.no_grad()
def _exercise(modules: list[nn.Linear], gen: torch.Generator, std: float = 0.02) -> None:
    """Give zero-initialized output projections (LoRA's B, an adapter's up) random values, so
    the added path changes the output as a trained one would."""
    for linear in modules:
        linear.weight.copy_(torch.randn(linear.weight.shape, generator=gen) * std)


def build_variants(config, bottlenecks: list[int], r: int, targets: str, dtype: torch.dtype,
                   seed: int = 0) -> dict[str, nn.Module]:
    """The base (LM head replaced by identity: outputs are the final hidden states) and each
    variant as a copy of it sharing the embeddings."""
    from lorafleet.lora import lora_layers, unload
    from lorafleet.models import build_model
    from lorafleet.train.methods import MethodConfig, apply_method

    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    base = build_model(config, device="cpu")
    base.lm_head = nn.Identity()
    base = base.to(dtype).eval().requires_grad_(False)
    embeddings = base.transformer.wte.weight, base.transformer.wpe.weight

    def clone(model: nn.Module, cfg: MethodConfig | None = None) -> nn.Module:
        model = copy.deepcopy(model, memo={id(p): p for p in embeddings})
        return model if cfg is None else apply_method(model, cfg).eval()

    unmerged = clone(base, MethodConfig("lora", r=r, alpha=2 * r, targets=targets))
    _exercise([layer.lora_B["default"] for _, layer in lora_layers(unmerged)], gen)
    out = {"base": base, "lora_merged": unload(clone(unmerged), "default"),
           "lora_unmerged": unmerged}
    for b in bottlenecks:
        for kind, variant in (("h", "houlsby"), ("l", "lin")):
            model = clone(base, MethodConfig("adapter", bottleneck=b, adapter_variant=variant))
            _exercise([m.up for m in adapter_modules(model)], gen)
            out[f"adapter_{kind}{b}"] = model
    return {name: m.requires_grad_(False) for name, m in out.items()}


def adapter_modules(model: nn.Module) -> list[nn.Module]:
    """The bottleneck adapters `apply_method(adapter)` inserted (Houlsby's or Lin's)."""
    from lorafleet.train.methods import BottleneckAdapter, LinAdapter
    return [m for m in model.modules() if isinstance(m, (BottleneckAdapter, LinAdapter))]


def added_parameters(model: nn.Module, base: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters()) - sum(p.numel() for p in base.parameters())


def forward_flops(config, batch: int, seq: int, head: bool = False) -> int:
    """Matmul FLOPs of one forward of the decoder stack: 2 per weight per token, plus QK^T and
    AV as dense [T, T] products (4 B T^2 d per layer); `head`: the LM head alone."""
    d, f = config.hidden_size, config.intermediate_size
    if head:
        return 2 * batch * seq * d * config.vocab_size
    per_layer = 2 * batch * seq * (4 * d * d + 2 * d * f) + 4 * batch * seq * seq * d
    return config.num_hidden_layers * per_layer


@torch.inference_mode()
def time_cell(models: dict[str, nn.Module], batch: int, seq: int, repeats: int, vocab: int,
              seed: int = 0) -> dict[str, dict[str, list[float]]]:
    """Seconds of one forward per model, `repeats` rounds after one warm-up round; the models run
    in turn within a round, the order rotating by one each round. Two clocks: "wall" and
    "cpu", this thread's CPU time (with one torch thread every op runs on it), which leaves out
    the time other processes on a shared machine hold the core."""
    ids = torch.randint(0, vocab, (batch, seq), generator=torch.Generator().manual_seed(seed))
    names = list(models)
    times = {clock: {n: [] for n in names} for clock in ("wall", "cpu")}
    for i in range(repeats + 1):
        for name in names[i % len(names):] + names[:i % len(names)]:
            wall, cpu = time.perf_counter(), time.thread_time()
            models[name](ids)
            if i:
                times["cpu"][name].append(time.thread_time() - cpu)
                times["wall"][name].append(time.perf_counter() - wall)
    return times


def repeats_for(tokens: int, cell_tokens: int, min_repeats: int, max_repeats: int) -> int:
    """Rounds for a cell: about `cell_tokens` tokens per model, within [min, max]."""
    return max(min_repeats, min(max_repeats, math.ceil(cell_tokens / tokens)))


def summarize_cell(times: dict[str, list[float]]) -> dict:
    base = times["base"]
    out = {}
    for name, t in times.items():
        ratios = [a / b for a, b in zip(t, base)]  # same round: seconds apart
        out[name] = {"median_ms": 1e3 * statistics.median(t), "mean_ms": 1e3 * statistics.mean(t),
                     "std_ms": 1e3 * statistics.pstdev(t), "min_ms": 1e3 * min(t),
                     "pct_over_base": 100 * (statistics.median(ratios) - 1),
                     "ratio_min": min(ratios), "ratio_max": max(ratios),
                     "times_ms": [round(1e3 * x, 3) for x in t]}
    return out


def latency_study(args) -> dict:
    from lorafleet.models.dtype import resolve_dtype

    dtype = resolve_dtype(args.dtype, prefer_half=True)
    config = gpt2_shape_config(args.layers, args.hidden, args.heads, args.intermediate,
                               args.vocab, max(max(s for _, s in args.cells), 1))
    models = build_variants(config, args.bottlenecks, args.r, args.targets, dtype, args.seed)
    # Thread CPU time measures a forward only when it runs on this one thread.
    clock, other = ("cpu", "wall") if args.threads == 1 else ("wall", "cpu")
    cells = []
    for batch, seq in args.cells:
        repeats = repeats_for(batch * seq, args.cell_tokens, args.min_repeats, args.max_repeats)
        start = time.perf_counter()
        times = time_cell(models, batch, seq, repeats, config.vocab_size, args.seed)
        body, head = forward_flops(config, batch, seq), forward_flops(config, batch, seq, True)
        cells.append({"batch": batch, "seq": seq, "repeats": repeats, "flops": body,
                      "head_flops_share_24_layers": head / (body * 24 / config.num_hidden_layers
                                                            + head),
                      "seconds": time.perf_counter() - start,
                      "variants": summarize_cell(times[clock]),
                      "other_clock": summarize_cell(times[other])})
        log.info("batch %d x seq %d: %d rounds, %.1f s; %s", batch, seq, repeats,
                 cells[-1]["seconds"], {n: round(v["pct_over_base"], 1)
                                        for n, v in cells[-1]["variants"].items()})
    base = models["base"]
    return {"model": {"shape": "GPT-2 medium per layer", "layers": config.num_hidden_layers,
                      "layers_gpt2_medium": GPT2_MEDIUM["layers"], "hidden": config.hidden_size,
                      "heads": config.num_attention_heads,
                      "intermediate": config.intermediate_size, "vocab": config.vocab_size,
                      "params_per_layer": sum(p.numel() for p in base.transformer.h[0]
                                              .parameters()),
                      "lm_head": "excluded (identity); same cost for every variant",
                      "dtype": str(dtype).removeprefix("torch."), "threads": args.threads},
            "variants": {name: {"added_params": added_parameters(m, base)}
                         for name, m in models.items()},
            "lora": {"r": args.r, "targets": args.targets, "modules": "attn.c_attn (GPT-2's "
                     "fused q,k,v: adapted whole, as PEFT does)"},
            "bottlenecks": args.bottlenecks, "clock": clock, "other_clock": other,
            "cells": cells}


# ---- checkpoint size and the GPT-3 arithmetic -------------------------------------------------

ADAPTERS = (("q,v", 4), ("q,v", 8), ("all-linear", 8))


def checkpoint_sizes(base_dir: Path) -> dict:
    """Save PEFT adapters of `base_dir`'s model and measure the files (bytes on disk)."""
    import lorafleet
    from lorafleet.models import load_model
    from lorafleet.train.methods import MethodConfig, apply_method

    base_bytes = sum(f.stat().st_size for f in base_dir.glob("*.safetensors"))
    rows = []
    with tempfile.TemporaryDirectory(prefix="lorafleet-eff-") as tmp:
        for targets, r in ADAPTERS:
            model = apply_method(load_model(base_dir), MethodConfig("lora", r=r, alpha=2 * r,
                                                                    targets=targets))
            folder = Path(lorafleet.save_adapter(model, Path(tmp) / f"{targets}-r{r}"))
            size = (folder / "adapter_model.safetensors").stat().st_size
            params = sum(p.numel() for p in model.parameters() if p.requires_grad)
            rows.append({"targets": targets, "r": r, "params": params, "bytes": size,
                         "config_bytes": (folder / "adapter_config.json").stat().st_size,
                         "tensor_bytes": 4 * params, "fraction_of_base": size / base_bytes})
        n_base = sum(p.numel() for p in load_model(base_dir).parameters())
    return {"base": str(base_dir), "base_params": n_base, "base_bytes": base_bytes,
            "adapters": rows}


def lora_params(layers: int, d_in: int, d_out: int, r: int, matrices: int = 2) -> int:
    """Trainable parameters of LoRA on `matrices` [d_out, d_in] weights per layer: r (in + out)
    each (A: [r, in], B: [out, r])."""
    return layers * matrices * r * (d_in + d_out)


def gpt3_arithmetic() -> dict:
    L, d = GPT3["layers"], GPT3["d_model"]
    params = 12 * L * d * d + (GPT3["vocab"] + GPT3["context"]) * d  # 4d^2 attn + 8d^2 FFN
    fp16 = 2
    adapters = {str(r): lora_params(L, d, d, r) for r in (1, 4, 8)}  # str: as JSON keys
    return {"params": params, "checkpoint_bytes_fp16": params * fp16,
            "lora_qv_params": adapters, "lora_qv_bytes_fp16": {r: n * fp16
                                                               for r, n in adapters.items()},
            "size_ratio_r4": params / adapters["4"],
            # 16-bit weights, gradients and two Adam moments vs frozen 16-bit weights only
            "train_bytes_full_8_per_param": params * 8, "train_bytes_lora": params * fp16,
            "gpt2_medium_lora_qv_r4": lora_params(GPT2_MEDIUM["layers"], GPT2_MEDIUM["hidden"],
                                                  GPT2_MEDIUM["hidden"], 4),
            "paper": PAPER_GPT3}


def training_reference(path: Path) -> dict | None:
    """LoRA vs full from `lorafleet bench train`'s committed run (not re-measured here)."""
    if not path.is_file():
        return None
    data = json.loads(path.read_text())
    runs = data.get("results", {})
    if "lora" not in runs or "full" not in runs:
        return None
    lora, full = runs["lora"], runs["full"]
    return {"source": str(path), "command": data["command"], "model_params":
            data["model"]["params"], "batch": data["batch"], "r": data["r"],
            "targets": data["targets"], "load_average": data.get("load_average"),
            "lora_step_s": lora["step_time_s"], "full_step_s": full["step_time_s"],
            "lora_step_times_s": lora["step_times_s"], "full_step_times_s": full["step_times_s"],
            "lora_memory_mib": lora["model_and_training_mib"],
            "full_memory_mib": full["model_and_training_mib"],
            "lora_trainable": lora["trainable_params"], "full_trainable":
            full["trainable_params"], "adapter_bytes": lora.get("adapter_bytes"),
            "checkpoint_bytes": data["model"]["checkpoint_bytes"]}


# ---- the run ---------------------------------------------------------------------------------

def measure_roofline(threads: int, n: int = 2048) -> dict:
    """bench train's matmul rates and bench serve's copy bandwidth (wall-clock, best of a few),
    and the matmul rates in this thread's CPU time, the latency study's clock."""
    from lorafleet.bench.roofline import COPY_BYTES, copy_seconds, matmul_seconds
    from lorafleet.bench.train import roofline
    out = roofline(threads, n)
    out["copy_bandwidth_gb_s"] = 2 * COPY_BYTES / min(copy_seconds(COPY_BYTES, 5)) / 1e9
    for dtype in (torch.float32, torch.bfloat16):
        best = min(matmul_seconds(n, dtype, 3, clock=time.thread_time))
        out[f"{str(dtype).removeprefix('torch.')}_gflops_cpu_time"] = 2 * n ** 3 / best / 1e9
    return out


def run_all(args) -> dict:
    from lorafleet import EMBEDDED_BASE
    from lorafleet.bench.train import _machine

    torch.set_num_threads(args.threads)
    start, load_start = time.time(), os.getloadavg()[0]
    result = {"command": "lorafleet bench efficiency " + " ".join(args.argv).strip(),
              "machine": _machine(),
              "roofline_start": measure_roofline(args.threads, args.roofline_n)}
    result["latency"] = latency_study(args)
    result["roofline_end"] = measure_roofline(args.threads, args.roofline_n)
    result["checkpoint"] = checkpoint_sizes(Path(args.base or EMBEDDED_BASE))
    result["gpt3"] = gpt3_arithmetic()
    result["training"] = training_reference(args.train_json)
    result["load_average"] = [load_start, os.getloadavg()[0]]
    result["seconds"] = round(time.time() - start, 1)
    return result


def _cells(text: str) -> list[tuple[int, int]]:
    from lorafleet.errors import ConfigError
    try:
        cells = [tuple(int(v) for v in c.lower().split("x")) for c in text.split(",") if c]
    except ValueError as exc:
        raise ConfigError(f"--cells: expected BATCHxSEQ,... (found {text!r})") from exc
    if not cells or any(len(c) != 2 or min(c) < 1 for c in cells):
        raise ConfigError(f"--cells: expected BATCHxSEQ,... with positive sizes (found {text!r})")
    return cells


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from lorafleet.models.dtype import add_dtype_argument
    shape = GPT2_MEDIUM
    parser.add_argument("--layers", type=int, default=2, help="decoder layers timed (GPT-2 "
                        "medium has 24; the %% over base is per layer, so fewer layers keep the "
                        "run to minutes on a CPU)")
    parser.add_argument("--hidden", type=int, default=shape["hidden"])
    parser.add_argument("--heads", type=int, default=shape["heads"])
    parser.add_argument("--intermediate", type=int, default=shape["intermediate"])
    parser.add_argument("--vocab", type=int, default=shape["vocab"])
    parser.add_argument("--cells", type=_cells, default=list(CELLS),
                        help="BATCHxSEQ,... (default: Table 1's, a batch sweep at 128, 1x16, 1x1)")
    parser.add_argument("--bottlenecks", type=lambda s: [int(b) for b in s.split(",")],
                        default=[16, 256], help="adapter widths (16: `method adapter`'s "
                        "default; 256: ~12M adapter parameters on GPT-2 medium, the paper's 11M)")
    parser.add_argument("--r", type=int, default=4, help="LoRA rank (the paper's GPT-2: 4)")
    parser.add_argument("--targets", default="q,v")
    add_dtype_argument(parser, help_suffix="; auto: bf16 where the CPU has bf16 instructions")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1: leave the "
                        "other core to the machine's other jobs)")
    parser.add_argument("--cell-tokens", type=int, default=8192, help="tokens per model per "
                        "cell; sets the rounds, within --min-repeats and --max-repeats")
    parser.add_argument("--min-repeats", type=int, default=6)
    parser.add_argument("--max-repeats", type=int, default=100, help="(the paper: 100 trials)")
    parser.add_argument("--roofline-n", type=int, default=2048, help="matmul size of the "
                        "roofline (n x n @ n x n, fp32 and bf16)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--base", type=Path, default=None,
                        help="model whose adapters are saved for the size table (default: "
                             "the embedded base)")
    parser.add_argument("--train-json", type=Path, default=TRAIN_RESULTS,
                        help="`lorafleet bench train` results to report training from")
    parser.add_argument("--json", type=Path, default=Path("docs/results/efficiency.json"))
    parser.add_argument("--figure", type=Path, default=Path("docs/figures/efficiency_latency.png"))
    parser.add_argument("--paper", type=Path, default=None, help="regenerate this doc's block")
    parser.add_argument("--from-json", type=Path, default=None,
                        help="skip the measurements; re-render the table, figure and block")


def run(args: argparse.Namespace) -> int:
    from lorafleet.bench.doc_block import replace_block, write_json
    from lorafleet.bench.efficiency_report import paper_block, plot, tables

    if args.from_json is not None:
        result = json.loads(args.from_json.read_text())
    else:
        if getattr(args, "argv", None) is None:  # through the CLI: lorafleet bench efficiency
            args.argv = sys.argv[3:] if sys.argv[1:3] == ["bench", "efficiency"] else []
        result = run_all(args)
        write_json(args.json, result, indent=1)
    figure = plot(result, args.figure) if args.figure else None
    print(tables(result))
    if args.paper is not None:
        link = None
        if figure is not None:
            try:
                link = str(figure.resolve().relative_to(args.paper.resolve().parent))
            except ValueError:
                link = str(figure)
        replace_block(args.paper, PAPER_BEGIN, PAPER_END, paper_block(result, link))
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_arguments(parser)
    logging.basicConfig(level=logging.INFO)
    args = parser.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    return run(args)


if __name__ == "__main__":
    raise SystemExit(main())
