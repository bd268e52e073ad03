"""`lorafleet bench kernels`: the serving engine's CPU operators against the PyTorch paths they
replace, on the serve benchmark's shapes, side by side in one process.

- batched heterogeneous LoRA for one projection: the C SGMV kernel reading pool pages in place
  (sgmv_cpu.py) vs the torch fallback (`sgmv_torch`, the same call; on the batch's first step
  it also derives its page list and mask) and its parts: copying the module's adapters out of
  the pool (`gather_segments`, one `index_select`), the dense masked path and the grouped path
  (one shrink + expand per segment) on the copied stacks; decode (one
  row per sequence, few sequences per adapter) and prefill (many rows per adapter); with the
  base projection's own matmul for scale;
- paged decode attention: the C kernel (attention_cpu.py) vs gather + `decode_attention`;
- a base projection at decode batch sizes: oneDNN-prepacked weights (packed_linear.py) vs
  `F.linear`.
Times are the median of `--repeats` calls, one torch thread by default.

    lorafleet bench kernels [--threads 1] [--json docs/results/kernels.json]
                            [--update-doc docs/benchmarks.md]
    lorafleet bench kernels --from-json docs/results/kernels.json \
        docs/results/kernels-2threads.json --update-doc docs/benchmarks.md
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import random
import statistics
import time
from pathlib import Path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--ranks", default="8,16,32")
    parser.add_argument("--decode-rows", type=int, default=21,
                        help="decode batch: rows, spread over --decode-adapters adapters")
    parser.add_argument("--decode-adapters", type=int, default=18)
    parser.add_argument("--prefill-segments", default="10x36",
                        help="prefill: SEGMENTSxROWS (one adapter per segment)")
    parser.add_argument("--context", type=int, default=64, help="decode attention context")
    parser.add_argument("--heads", default="16,4", help="query heads, KV heads")
    parser.add_argument("--repeats", type=int, default=50)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--from-json", type=Path, nargs="+", default=None,
                        help="measure nothing: render the tables of these saved runs, in order")
    parser.add_argument("--update-doc", type=Path, default=None,
                        help="rewrite the `bench kernels` block of this doc (docs/benchmarks.md)")


def _time(fn, repeats: int) -> float:
    """Median seconds of `repeats` calls after 3 warm-up calls."""
    for _ in range(3):
        fn()
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - start)
    return statistics.median(samples)


def _lora_case(torch, hidden, ranks, rows_per_segment, seed):
    """A pool with one adapter per segment (pages shuffled), the PagedModuleLora for a hidden x
    hidden projection, and x."""
    from lorafleet.serve.lora_ops import PagedModuleLora

    gen = torch.Generator().manual_seed(seed)
    num_pages = 2 * sum(ranks) + 64
    pages = (torch.randn(num_pages, hidden, generator=gen) * 0.02).bfloat16()
    free = torch.randperm(num_pages, generator=gen).tolist()
    page_ids, seg_rows, seg_a, seg_b, row = [], [], [], [], 0
    for rank, rows in zip(ranks, rows_per_segment):
        seg_a.append(len(page_ids))
        page_ids += [free.pop() for _ in range(rank)]
        seg_b.append(len(page_ids))
        page_ids += [free.pop() for _ in range(rank)]
        seg_rows.append((row, row + rows))
        row += rows
    i32 = dict(dtype=torch.int32)
    paged = PagedModuleLora(hidden, hidden, 1, 1, torch.tensor(seg_rows, **i32),
                            torch.tensor(ranks, **i32), torch.full((len(ranks),), 2.0),
                            torch.tensor(seg_a, **i32), torch.tensor(seg_b, **i32),
                            torch.tensor(page_ids, **i32), max(ranks), max(rows_per_segment))
    x = torch.randn(row, hidden, generator=gen).bfloat16()
    return pages, paged, x


def run(args) -> int:
    from lorafleet.bench.doc_block import write_block, write_json

    if args.from_json:
        reports = [json.loads(path.read_text()) for path in args.from_json]
    else:
        reports = [measure(args)]
        if args.json:
            write_json(args.json, reports[0], indent=2)
    print(markdown(reports))
    if args.update_doc:
        write_block(args.update_doc, "kernels", markdown(reports))
    return 0


def measure(args) -> dict:
    import torch
    import torch.nn.functional as F
    from torch import nn

    from lorafleet.serve.attention import decode_attention
    from lorafleet.serve.attention_cpu import decode_kernel_available, paged_decode_attention
    from lorafleet.serve.lora_ops import (gather_segments, lora_delta_dense, lora_delta_grouped,
                                          segment_mask, sgmv_torch)
    from lorafleet.serve.packed_linear import PackedLinear, can_prepack
    from lorafleet.serve.sgmv_cpu import sgmv_cpu, sgmv_cpu_available

    from lorafleet.bench.doc_block import command_line, run_ended, run_info

    info = run_info(command_line("kernels", args))
    torch.set_num_threads(args.threads)
    rng = random.Random(args.seed)
    ranks = [int(r) for r in args.ranks.split(",")]
    hidden, repeats, results = args.hidden, args.repeats, {}
    weight = (torch.randn(hidden, hidden) * 0.02).bfloat16()

    def us(seconds):
        return round(seconds * 1e6, 1)

    print(f"{torch.get_num_threads()} torch thread(s), bf16, hidden {hidden}, ranks {ranks}")
    # ---- batched LoRA: decode and prefill ------------------------------------------------
    segments, rows = (int(v) for v in args.prefill_segments.split("x"))
    decode_rows = [1] * args.decode_adapters
    for i in range(args.decode_rows - args.decode_adapters):
        decode_rows[i % args.decode_adapters] += 1
    cases = {"decode": decode_rows, "prefill": [rows] * segments}
    for case, rows_per_segment in cases.items():
        case_ranks = [rng.choice(ranks) for _ in rows_per_segment]
        pages, paged, x = _lora_case(torch, hidden, case_ranks, rows_per_segment, args.seed)
        y = torch.zeros(x.shape[0], hidden, dtype=torch.bfloat16)
        a, bt, segments = gather_segments(pages, paged)
        mask = segment_mask(x.shape[0], segments, a.shape[0], torch.bfloat16, pages.device)
        timing = {"rows": x.shape[0], "adapters": len(case_ranks), "sum_rank": sum(case_ranks),
                  "base_matmul_us": us(_time(lambda: F.linear(x, weight), repeats)),
                  "torch_dense_us": us(_time(lambda: lora_delta_dense(y, x, a, bt, mask),
                                             repeats)),
                  "torch_grouped_us": us(_time(lambda: lora_delta_grouped(y, x, a, bt, segments),
                                               repeats)),
                  "gather_us": us(_time(lambda: gather_segments(pages, paged), repeats)),
                  "torch_fallback_us": us(_time(lambda: sgmv_torch(y, x, pages, paged),
                                                repeats)),
                  # a batch's first step: the copy plan and mask derived anew (a fresh object)
                  "torch_fallback_first_us": us(_time(lambda: sgmv_torch(
                      y, x, pages, dataclasses.replace(paged)), repeats))}
        if sgmv_cpu_available(pages):
            timing["sgmv_kernel_us"] = us(_time(lambda: sgmv_cpu(y, x, pages, paged), repeats))
        results[f"lora_{case}"] = timing
        print(f"LoRA {case:7} ({timing['rows']} rows, {timing['adapters']} adapters, sum of "
              f"ranks {timing['sum_rank']}): kernel {timing.get('sgmv_kernel_us', 'n/a')} us | "
              f"torch fallback {timing['torch_fallback_us']} us, first step "
              f"{timing['torch_fallback_first_us']} us (dense "
              f"{timing['torch_dense_us']} + gather {timing['gather_us']} us, grouped "
              f"{timing['torch_grouped_us']} us) | base matmul {timing['base_matmul_us']} us")
    # ---- paged decode attention -------------------------------------------------------------
    n_heads, n_kv = (int(v) for v in args.heads.split(","))
    head_dim, batch = hidden // n_heads, args.decode_rows
    gen = torch.Generator().manual_seed(args.seed)
    kv_rows = torch.randn(4 * batch * args.context, n_kv * head_dim, generator=gen).bfloat16()
    # rows in pages of H // kv_dim consecutive rows, pages scattered (as the pool holds them)
    per_page = hidden // (n_kv * head_dim)
    page_order = torch.randperm(kv_rows.shape[0] // per_page, generator=gen)
    slots = (page_order[:, None] * per_page + torch.arange(per_page)).view(-1)
    k_slots = slots[:batch * args.context].view(batch, -1).contiguous()
    v_slots = slots[batch * args.context:2 * batch * args.context].view(batch, -1).contiguous()
    lens = torch.randint(args.context // 2, args.context + 1, (batch,), generator=gen)
    q = torch.randn(batch, n_heads, head_dim, generator=gen).bfloat16()
    mask = (torch.arange(args.context)[None, :] < lens[:, None])[:, None, None, :]

    def torch_attention():
        keys = kv_rows.index_select(0, k_slots.view(-1)).view(batch, -1, n_kv, head_dim)
        values = kv_rows.index_select(0, v_slots.view(-1)).view(batch, -1, n_kv, head_dim)
        return decode_attention(q, keys, values, mask, head_dim ** -0.5)

    timing = {"batch": batch, "context": args.context,
              "torch_us": us(_time(torch_attention, repeats))}
    if decode_kernel_available(kv_rows):
        timing["kernel_us"] = us(_time(lambda: paged_decode_attention(
            q, kv_rows, k_slots, v_slots, lens, head_dim ** -0.5), repeats))
    results["decode_attention"] = timing
    print(f"decode attention (batch {batch}, context <= {args.context}, {n_heads}/{n_kv} "
          f"heads): kernel {timing.get('kernel_us', 'n/a')} us | torch gather + matmuls "
          f"{timing['torch_us']} us")
    # ---- prepacked base projections ---------------------------------------------------------
    linear = nn.Linear(hidden, 4 * hidden, bias=False).bfloat16().requires_grad_(False)
    if can_prepack(linear):
        packed = PackedLinear(linear)
        for m in (1, 4, args.decode_rows, 64):
            x = torch.randn(m, hidden).bfloat16()
            timing = {"rows": m, "linear_us": us(_time(lambda: F.linear(x, linear.weight),
                                                       repeats)),
                      "packed_us": us(_time(lambda: packed(x), repeats))}
            results[f"projection_{m}_rows"] = timing
            print(f"projection {4 * hidden}x{hidden}, {m:3} rows: packed {timing['packed_us']} "
                  f"us | F.linear {timing['linear_us']} us")
    results["config"] = {"hidden": hidden, "ranks": ranks, "heads": [n_heads, n_kv],
                         "threads": torch.get_num_threads(), "repeats": repeats,
                         "seed": args.seed}
    results["run"] = run_ended(info)
    return results


def _us(value) -> str:
    return "n/a" if value is None else f"{value:.0f} us"


def markdown(reports: list[dict]) -> str:
    """The docs/benchmarks.md block: one table per saved run (e.g. 1 and 2 threads)."""
    from lorafleet.bench.doc_block import run_line

    lines = []
    for report in reports:
        c = report["config"]
        lines += [run_line(report["run"]), "",
                  f"bf16, hidden {c['hidden']}, adapter ranks drawn from {c['ranks']}, "
                  f"{c['threads']} thread(s), median of {c['repeats']} calls.", "",
                  "| operator | shape | C kernel | torch fallback (`sgmv_torch`: copy + dense "
                  "or grouped) | base matmul, for scale |", "|---|---|---|---|---|"]
        for case in ("decode", "prefill"):
            t = report.get(f"lora_{case}")
            if t is None:
                continue
            lines.append(
                f"| batched LoRA, {case} | {t['rows']} rows, {t['adapters']} adapters, sum of "
                f"ranks {t['sum_rank']}, {c['hidden']} -> {c['hidden']} | "
                f"{_us(t.get('sgmv_kernel_us'))} | {_us(t['torch_fallback_us'])} (first step "
                f"of a batch {_us(t['torch_fallback_first_us'])}): dense masked "
                f"{_us(t['torch_dense_us'])} + copy out of the pool {_us(t['gather_us'])} "
                f"(grouped: {_us(t['torch_grouped_us'])}) | {_us(t['base_matmul_us'])} |")
        attention = report.get("decode_attention")
        if attention:
            lines.append(f"| decode attention | {attention['batch']} sequences, context <= "
                         f"{attention['context']}, {c['heads'][0]} / {c['heads'][1]} heads | "
                         f"{_us(attention.get('kernel_us'))} | gather + matmuls "
                         f"{_us(attention['torch_us'])} | |")
        projections = [v for k, v in report.items() if k.startswith("projection_")]
        if projections:
            rows = " / ".join(str(p["rows"]) for p in projections)
            packed = " / ".join(f"{p['packed_us']:.0f}" for p in projections)
            plain = " / ".join(f"{p['linear_us']:.0f}" for p in projections)
            lines.append(f"| projection {4 * c['hidden']}x{c['hidden']} | {rows} rows | packed "
                         f"{packed} us | `F.linear` {plain} us | |")
        lines.append("")
    return "\n".join(lines).rstrip("\n")
