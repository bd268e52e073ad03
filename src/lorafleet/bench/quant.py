"""NF4 speed and size: ours vs bitsandbytes' CPU NF4 vs a plain bf16 linear, on the same matrices
in one run, measured round-robin so every contender sees the same machine load.

    lorafleet bench quant [--shapes 4096x4096,11008x4096] [--tokens 1,16] [--repeats 5]
                          [--threads 1] [--json out.json] [--update-doc docs/benchmarks.md]
    lorafleet bench quant --from-json docs/results/quant.json --update-doc docs/benchmarks.md

For each weight [out, in] (random N(0, 0.02), bf16, block 64, double quantization on both sides):
- quantize: bf16 weight -> NF4 (ours `quantize_nf4` / bnb `quantize_4bit(compress_statistics)`)
- dequantize: NF4 -> bf16 matrix (ours `dequantize_nf4` / bnb `dequantize_4bit`)
- linear: y = x W^T for x [tokens, in] in bf16: our `Linear4bit` (the fused C kernel up to 16
  tokens, else chunked decode + matmul) and `ours_torch` (its torch-only path, the fallback); bnb
  `Linear4bit` in training mode (dequantize, then F.linear) and in eval mode (bnb repacks the
  weight for its fused AVX512-BF16 4-bit GEMM kernel, when the CPU has one); `nn.Linear` in bf16.
Times are wall-clock milliseconds, best of --repeats (median in the JSON); ratio = other / ours
(> 1: ours faster). Sizes are the bytes each format stores per parameter.
"""
from __future__ import annotations

import argparse
import json
import logging
import statistics
import time
from pathlib import Path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--shapes", default="4096x4096,11008x4096",
                        help="comma-separated OUTxIN weight shapes")
    parser.add_argument("--tokens", default="1,16", help="comma-separated batch sizes (tokens)")
    parser.add_argument("--repeats", type=int, default=5)
    # 1 by default: on a shared, oversubscribed CPU every OpenMP parallel region waits for a
    # scheduler slice (~12 ms measured for a 0.03 ms op at 2 threads on the dev box), so
    # multi-thread timings there measure the scheduler, not the kernels. Pass 0 for torch's default.
    parser.add_argument("--threads", type=int, default=1, help="torch threads (0: torch default)")
    parser.add_argument("--json", "--out", dest="json", type=Path, default=None,
                        help="write the results here")
    parser.add_argument("--from-json", type=Path, default=None,
                        help="measure nothing: render the table of this saved JSON")
    parser.add_argument("--update-doc", type=Path, default=None,
                        help="rewrite the `bench quant` block of this doc (docs/benchmarks.md)")


def _time_round_robin(contenders: dict, repeats: int) -> dict[str, dict[str, float]]:
    """Call each contender once per round (after one warm-up round); ms best and median."""
    times: dict[str, list[float]] = {name: [] for name in contenders}
    for round_ in range(repeats + 1):
        for name, fn in contenders.items():
            start = time.perf_counter()
            fn()
            if round_:
                times[name].append((time.perf_counter() - start) * 1e3)
    return {name: {"best_ms": min(t), "median_ms": statistics.median(t)}
            for name, t in times.items()}


def _bnb_linear(weight, training: bool):
    import bitsandbytes as bnb
    import torch

    out_features, in_features = weight.shape
    layer = bnb.nn.Linear4bit(in_features, out_features, bias=False, compute_dtype=torch.bfloat16,
                              compress_statistics=True, quant_type="nf4")
    layer.weight = bnb.nn.Params4bit(weight.clone(), requires_grad=False, quant_type="nf4",
                                     blocksize=64, compress_statistics=True)
    layer = layer.to("cpu")  # quantizes
    return layer.train(training)


def _without_kernel(layer, x):
    """Our forward on the torch path only (what runs where the C kernel cannot be built)."""
    from lorafleet.quant import kernel

    saved, kernel.KERNEL_MAX_TOKENS = kernel.KERNEL_MAX_TOKENS, 0
    try:
        return layer(x)
    finally:
        kernel.KERNEL_MAX_TOKENS = saved


def measure_shape(out_features: int, in_features: int, tokens: list[int], repeats: int) -> dict:
    import bitsandbytes.functional as bnbF
    import torch
    from torch import nn

    from lorafleet.quant import Linear4bit, dequantize_nf4, quantize_nf4

    torch.manual_seed(0)
    weight = (torch.randn(out_features, in_features) * 0.02).to(torch.bfloat16)
    result: dict = {"shape": [out_features, in_features]}

    nf4 = quantize_nf4(weight, 64, double_quant=True)
    packed, state = bnbF.quantize_4bit(weight, blocksize=64, quant_type="nf4",
                                       compress_statistics=True)
    bnb_bytes = (packed.numel() + state.absmax.numel() + 4 * state.state2.absmax.numel() + 4)
    result["bytes_per_param"] = {"ours": nf4.nbytes / weight.numel(),
                                 "bnb": bnb_bytes / weight.numel(), "bf16": 2.0}
    result["quantize"] = _time_round_robin({
        "ours": lambda: quantize_nf4(weight, 64, double_quant=True),
        "bnb": lambda: bnbF.quantize_4bit(weight, blocksize=64, quant_type="nf4",
                                          compress_statistics=True),
    }, repeats)
    result["dequantize"] = _time_round_robin({
        "ours": lambda: dequantize_nf4(nf4, torch.bfloat16),
        "bnb": lambda: bnbF.dequantize_4bit(packed, state),
    }, repeats)

    ours = Linear4bit.from_module(nn.Linear(in_features, out_features, bias=False))
    ours.set_weight(weight.float())
    bf16 = nn.Linear(in_features, out_features, bias=False, dtype=torch.bfloat16)
    with torch.no_grad():
        bf16.weight.copy_(weight)
        bnb_train, bnb_eval = _bnb_linear(weight, True), _bnb_linear(weight, False)
        for t in tokens:
            x = torch.randn(t, in_features, dtype=torch.bfloat16)
            bnb_eval(x)  # first eval call repacks the weight for the fused kernel
            result[f"linear_{t}"] = _time_round_robin({
                "ours": lambda: ours(x), "ours_torch": lambda: _without_kernel(ours, x),
                "bnb_dequant": lambda: bnb_train(x),
                "bnb_fused": lambda: bnb_eval(x), "bf16": lambda: bf16(x),
            }, repeats)
            reference = bf16(x).float()
            result[f"linear_{t}"]["rel_error_vs_bf16"] = {
                name: ((fn(x).float() - reference).norm() / reference.norm()).item()
                for name, fn in (("ours", ours),
                                 ("ours_torch", lambda x: _without_kernel(ours, x)),
                                 ("bnb_dequant", bnb_train),
                                 ("bnb_fused", bnb_eval))}
    return result


def _rows(result: dict) -> list[tuple[str, str, float, str]]:
    rows = []
    for op, timings in result.items():
        if op not in ("quantize", "dequantize") and not op.startswith("linear_"):
            continue
        ours = timings["ours"]["best_ms"]
        for name, t in timings.items():
            if isinstance(t, dict) and "best_ms" in t:
                ratio = "" if name == "ours" else f"{t['best_ms'] / ours:.2f}x"
                rows.append((op, name, t["best_ms"], ratio))
    return rows


def run(args) -> int:
    from lorafleet.bench.doc_block import write_block, write_json

    if args.from_json is not None:
        results = json.loads(args.from_json.read_text())
    else:
        results = measure(args)
        if args.json:
            write_json(args.json, results, indent=2)
            print(f"\nwrote {args.json}")
    print(markdown(results))
    if args.update_doc:
        write_block(args.update_doc, "quant", markdown(results))
    return 0


def measure(args) -> dict:
    import torch

    from lorafleet.bench.doc_block import command_line, run_ended, run_info
    from lorafleet.quant.kernel import kernel_available

    info = run_info(command_line("quant", args))
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
    if args.threads:
        torch.set_num_threads(args.threads)
    shapes = [tuple(int(n) for n in s.lower().split("x")) for s in args.shapes.split(",")]
    tokens = [int(t) for t in args.tokens.split(",")]
    results = {"threads": torch.get_num_threads(), "repeats": args.repeats, "block_size": 64,
               "double_quant": True, "nf4_kernel": kernel_available(), "tokens": tokens,
               "shapes": []}
    for out_features, in_features in shapes:
        result = measure_shape(out_features, in_features, tokens, args.repeats)
        results["shapes"].append(result)
        print(f"\nW [{out_features} x {in_features}] bf16, NF4 block 64 + double quant; "
              f"{results['threads']} threads; best of {args.repeats}; fused NF4 kernel "
              f"{'built' if results['nf4_kernel'] else 'unavailable (torch path)'}")
        print(f"{'op':<14}{'impl':<13}{'ms':>10}{'other/ours':>12}")
        for op, name, ms, ratio in _rows(result):
            print(f"{op:<14}{name:<13}{ms:>10.2f}{ratio:>12}")
    results["run"] = run_ended(info)
    return results


# table columns: (JSON contender, header)
COLUMNS = (("ours", "lorafleet"), ("ours_torch", "torch path"),
           ("bnb_dequant", "bnb dequant + matmul"), ("bnb", "bnb"),
           ("bnb_fused", "bnb fused CPU kernel"), ("bf16", "bf16 nn.Linear"))


def _ms(value: float) -> str:
    return f"{value:.3g}" if value < 100 else f"{value:.0f}"


def markdown(results: dict) -> str:
    """The docs/benchmarks.md block of one run's JSON: best-of ms per operation, one cell per
    contender holding every shape's time (shapes separated by /)."""
    from lorafleet.bench.doc_block import run_line

    shapes = results["shapes"]
    names = " / ".join("x".join(str(n) for n in s["shape"]) for s in shapes)
    ops = ["quantize", "dequantize"] + [k for k in shapes[0] if k.startswith("linear_")]
    # bnb's quantize/dequantize go in the "bnb dequant + matmul" column: it is bnb's own path
    column_of = {"bnb": "bnb_dequant"}
    used = [(key, head) for key, head in COLUMNS if key != "bnb"]
    lines = [run_line(results["run"]), "",
             f"Weights [out x in] = {names}, bf16 N(0, 0.02); NF4 block {results['block_size']}"
             f"{', double quantization' if results['double_quant'] else ''} on both sides; "
             f"{results['threads']} torch thread(s); milliseconds, best of {results['repeats']} "
             f"round-robin rounds (medians in the JSON); fused NF4 kernel "
             f"{'built' if results['nf4_kernel'] else 'unavailable, so lorafleet = torch path'}"
             ". Stored bits/param: " + "; ".join(
                 f"{'x'.join(map(str, s['shape']))}: lorafleet "
                 f"{8 * s['bytes_per_param']['ours']:.3f}, bnb "
                 f"{8 * s['bytes_per_param']['bnb']:.3f}"
                 for s in shapes) + ".", "",
             f"| {names} | " + " | ".join(head for _, head in used) + " |",
             "|---" * (len(used) + 1) + "|"]
    for op in ops:
        tokens = op.removeprefix("linear_")
        label = op if tokens == op else f"forward, {tokens} token{'' if tokens == '1' else 's'}"
        cells = []
        for key, _ in used:
            times = []
            for s in shapes:
                timings = s[op]
                found = next((t for name, t in timings.items()
                              if column_of.get(name, name) == key and isinstance(t, dict)
                              and "best_ms" in t), None)
                times.append(None if found is None else found["best_ms"])
            cells.append("" if all(t is None for t in times) else
                         " / ".join("-" if t is None else _ms(t) for t in times))
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    for op in ops:
        if not op.startswith("linear_"):
            continue
        ratios = []
        for s in shapes:
            ours = s[op]["ours"]["best_ms"]
            ratios.append(f"{'x'.join(map(str, s['shape']))}: bf16 "
                          f"{s[op]['bf16']['best_ms'] / ours:.2f}x, torch path "
                          f"{s[op]['ours_torch']['best_ms'] / ours:.1f}x, bnb's fused kernel "
                          f"{s[op]['bnb_fused']['best_ms'] / ours:.2f}x")
        lines += ["", f"{op.removeprefix('linear_')}-token forward, other's time / "
                  f"lorafleet's (> 1: lorafleet faster): {'; '.join(ratios)}."]
    errors = shapes[0].get(f"{ops[-1]}", {}).get("rel_error_vs_bf16")
    if errors:
        lines += ["", f"Relative error of the {ops[-1].removeprefix('linear_')}-token forward "
                  f"against bf16 weights ({names.split(' / ')[0]}): " +
                  ", ".join(f"{name} {value:.4f}" for name, value in errors.items()) + "."]
    return "\n".join(lines)
