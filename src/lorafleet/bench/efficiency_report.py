"""Tables, figure and the docs/paper.md block of `lorafleet bench efficiency` (efficiency.py),
from its JSON alone, so `--from-json` re-renders them without measuring."""
from __future__ import annotations

import statistics
from pathlib import Path

SWEEP_SEQ = 128  # appendix B's batch axis is drawn at this sequence length
# LoRA Table 1's columns (batch, sequence) and rows as published (ms, one forward of GPT-2
# medium on a Quadro RTX8000, mean of 100 trials).
PAPER_CELLS = ((32, 512), (16, 256), (1, 128))
PAPER_TABLE1 = {"base": (1449.4, 338.0, 19.8), "adapter_l": (1482.0, 354.8, 23.9),
                "adapter_h": (1492.2, 366.3, 25.8)}


def label(name: str, lat: dict) -> str:
    if name == "base":
        return "base (= full fine-tune)"
    if name == "lora_merged":
        return "LoRA merged"
    if name == "lora_unmerged":
        return f"LoRA unmerged (r={lat['lora']['r']}, {lat['lora']['targets']})"
    kind, width = name.removeprefix("adapter_")[0], name.removeprefix("adapter_")[1:]
    return f"Adapter^{kind.upper()} (bottleneck {width})"


def ratio_quartiles(cell: dict, name: str) -> tuple[float, float]:
    """The 25th and 75th percentiles of the per-round ratios variant / base, in %, from the
    rounds' times (both were timed in the same round, seconds apart)."""
    ratios = [a / b for a, b in zip(cell["variants"][name]["times_ms"],
                                    cell["variants"]["base"]["times_ms"])]
    if len(ratios) < 2:
        return (100 * (ratios[0] - 1),) * 2
    q1, _, q3 = statistics.quantiles(ratios, n=4, method="inclusive")
    return 100 * (q1 - 1), 100 * (q3 - 1)


def _cell_name(c: dict) -> str:
    return f"{c['batch']} x {c['seq']}"


def _pct(v: dict) -> str:
    return f"{v['pct_over_base']:+.1f}%"


def _table1_cells(lat: dict) -> list[dict]:
    """The paper's cells and the short sequences, in that order; the seq-128 sweep apart."""
    return [c for c in lat["cells"] if (c["batch"], c["seq"]) in PAPER_CELLS
            or (c["seq"] < SWEEP_SEQ)] or lat["cells"]


def _sweep_cells(lat: dict) -> list[dict]:
    return sorted((c for c in lat["cells"] if c["seq"] == SWEEP_SEQ), key=lambda c: c["batch"])


def latency_table(lat: dict) -> str:
    cells = _table1_cells(lat)
    lines = ["| batch x sequence | " + " | ".join(_cell_name(c) for c in cells) + " |",
             "|---|" + "---:|" * len(cells),
             "| rounds | " + " | ".join(str(c["repeats"]) for c in cells) + " |"]
    for name in cells[0]["variants"]:
        row = []
        for c in cells:
            v = c["variants"][name]
            ms = f"{v['median_ms']:.1f} ± {v['std_ms']:.1f}" if v["median_ms"] >= 10 else \
                f"{v['median_ms']:.2f} ± {v['std_ms']:.2f}"
            row.append(ms if name == "base" else f"{ms} ({_pct(v)})")
        lines.append(f"| {label(name, lat)} | " + " | ".join(row) + " |")
    paper = {cell: i for i, cell in enumerate(PAPER_CELLS)}
    if not any((c["batch"], c["seq"]) in paper for c in cells):
        return "\n".join(lines)
    for name, values in PAPER_TABLE1.items():
        row = []
        for c in cells:
            i = paper.get((c["batch"], c["seq"]))
            if i is None:
                row.append("")
                continue
            pct = 100 * (values[i] / PAPER_TABLE1["base"][i] - 1)
            row.append(f"{values[i]:.1f}" + ("" if name == "base" else f" ({pct:+.1f}%)"))
        who = {"base": "Fine-Tune/LoRA", "adapter_l": "Adapter^L", "adapter_h": "Adapter^H"}[name]
        lines.append(f"| paper (GPT-2 M, 24 layers, RTX8000 GPU): {who} | "
                     + " | ".join(row) + " |")
    return "\n".join(lines)


def sweep_table(lat: dict) -> str:
    cells = _sweep_cells(lat)
    if not cells:
        return ""
    lines = [f"| % over base at sequence {SWEEP_SEQ}, batch | "
             + " | ".join(str(c["batch"]) for c in cells) + " |",
             "|---|" + "---:|" * len(cells),
             "| base (ms, median) | " + " | ".join(f"{c['variants']['base']['median_ms']:.1f}"
                                                  for c in cells) + " |"]
    for name in cells[0]["variants"]:
        if name == "base":
            continue
        lines.append(f"| {label(name, lat)} | " + " | ".join(
            f"{_pct(c['variants'][name])} ({ratio_quartiles(c, name)[0]:+.0f}.."
            f"{ratio_quartiles(c, name)[1]:+.0f})" for c in cells) + " |")
    return "\n".join(lines)


def checkpoint_table(ck: dict) -> str:
    lines = ["| what | parameters | file bytes | 4 bytes x parameters | / base file |",
             "|---|---:|---:|---:|---:|",
             f"| base (`model.safetensors`) | {ck['base_params']:,} | {ck['base_bytes']:,} | "
             f"{4 * ck['base_params']:,} | 1 |"]
    for a in ck["adapters"]:
        lines.append(f"| LoRA {a['targets']} r={a['r']} (`adapter_model.safetensors`) | "
                     f"{a['params']:,} | {a['bytes']:,} | {a['tensor_bytes']:,} | "
                     f"1/{1 / a['fraction_of_base']:,.0f} |")
    return "\n".join(lines)


def gpt3_lines(g: dict) -> list[str]:
    qv, qv_bytes, paper = g["lora_qv_params"], g["lora_qv_bytes_fp16"], g["paper"]
    return [
        f"- GPT-3 175B: 96 layers, d_model 12288; parameters 12 L d^2 + (vocab + context) d = "
        f"{g['params']:,}; in fp16 {g['checkpoint_bytes_fp16'] / 1e9:.0f} GB (paper: "
        f"{paper['checkpoint_gb']} GB).",
        f"- LoRA on Wq and Wv: L x 2 x r (d + d) parameters: r=1 {qv['1']:,}, r=4 {qv['4']:,}, "
        f"r=8 {qv['8']:,}; at r=4 in fp16 {qv_bytes['4'] / 1e6:.1f} MB "
        f"({qv_bytes['4'] / 2**20:.1f} MiB; paper: {paper['adapter_mb']} MB), "
        f"{g['size_ratio_r4']:,.0f}x smaller than the model (paper: ~10,000x). The paper's "
        f"\"4.7M\" trainable parameters are r=1.",
        f"- Training memory: full fine-tuning with Adam holds 16-bit weights, gradients and two "
        f"moments, 8 bytes per parameter = {g['train_bytes_full_8_per_param'] / 1e12:.2f} TB "
        f"(paper: {paper['train_vram_full_tb']} TB); LoRA holds the frozen 16-bit weights, "
        f"{g['train_bytes_lora'] / 1e9:.0f} GB (paper: {paper['train_vram_lora_gb']} GB), plus "
        f"the adapter's few MB of state.",
        f"- GPT-2 medium, q,v r=4: 24 x 2 x 4 x 2048 = {g['gpt2_medium_lora_qv_r4']:,} (the "
        f"paper's Table 3 says 0.35M: a known erratum).",
    ]


def training_lines(t: dict | None) -> list[str]:
    if t is None:
        return ["- No `lorafleet bench train` results were found (run it first)."]
    step = t["lora_step_s"] / t["full_step_s"]
    mem = t["lora_memory_mib"] / t["full_memory_mib"]
    return [
        f"- From `{t['source']}` (`{t['command']}`; not re-measured here): random Llama of "
        f"{t['model_params'] / 1e6:.0f}M parameters, batch {t['batch'][0]} x {t['batch'][1]} "
        f"tokens, LoRA r={t['r']} on {t['targets']}, AdamW, fp32, load average "
        f"{t['load_average'][0]:.1f} -> {t['load_average'][1]:.1f}.",
        f"- Memory (model + training, MiB): LoRA {t['lora_memory_mib']:.0f} vs full "
        f"{t['full_memory_mib']:.0f}, ratio {mem:.2f} (paper, GPT-3: 350 GB / 1.2 TB = 0.29).",
        f"- Step time (median of {len(t['lora_step_times_s'])} steps): LoRA "
        f"{t['lora_step_s']:.1f} s vs full {t['full_step_s']:.1f} s, ratio {step:.2f} (steps: "
        f"LoRA {', '.join(f'{x:.1f}' for x in t['lora_step_times_s'])}; full "
        f"{', '.join(f'{x:.1f}' for x in t['full_step_times_s'])}). The paper reports 25% higher "
        f"training throughput on GPT-3 (time ratio 0.75); LoRA skips the weight gradients (a "
        f"third of the matmul FLOPs: floor 0.67) and Adam over all weights. Two steps on a "
        f"loaded 2-core machine spread more than that difference, so this run does not settle "
        f"the step-time claim; the memory ratio is robust.",
    ]


def flops_pct(lat: dict, cell: dict, name: str) -> float:
    """The % a variant's added matmuls add to the base's FLOPs in `cell`: 2 FLOPs per added
    weight per token (LoRA's A and B, an adapter's down and up; biases and norms left out)."""
    added = lat["variants"][name]["added_params"]
    return 100 * 2 * added * cell["batch"] * cell["seq"] / cell["flops"]


def verdict(lat: dict) -> str:
    cells = lat["cells"]
    noise = max(abs(c["variants"]["lora_merged"]["pct_over_base"]) for c in cells)
    parts = [f"LoRA merged has the base's modules exactly (`unload`), so its difference from "
             f"the base is the measurement noise: at most {noise:.1f}% in any cell."]
    by_tokens = sorted(cells, key=lambda c: c["batch"] * c["seq"])
    small, large = by_tokens[0], by_tokens[-1]
    for name in cells[0]["variants"]:
        if name in ("base", "lora_merged"):
            continue
        worst = max(cells, key=lambda c: c["variants"][name]["pct_over_base"])
        parts.append(
            f"{label(name, lat)}: {_pct(small['variants'][name])} at {_cell_name(small)} "
            f"(its FLOPs: +{flops_pct(lat, small, name):.1f}%), "
            f"{_pct(large['variants'][name])} at {_cell_name(large)} "
            f"(FLOPs +{flops_pct(lat, large, name):.1f}%); largest "
            f"{_pct(worst['variants'][name])} at {_cell_name(worst)}.")
    return " ".join(parts)


def _clock_text(lat: dict) -> str:
    if lat.get("clock", "wall") == "cpu":
        return ("times are this thread's CPU time per forward (one torch thread runs every op "
                "on it), which leaves out the time other jobs held the core on this shared "
                "machine; the wall-clock times are in the JSON (`other_clock`).")
    return "times are wall-clock."


def roofline_text(result: dict) -> str:
    lat, start, end = result["latency"], result["roofline_start"], result["roofline_end"]
    dtype = lat["model"]["dtype"]
    cpu = lat.get("clock") == "cpu" and f"{dtype}_gflops_cpu_time" in end
    rate = f"{dtype}_gflops" + ("_cpu_time" if cpu else "")
    big = max(lat["cells"], key=lambda c: c["batch"] * c["seq"])
    achieved = big["flops"] / (big["variants"]["base"]["median_ms"] / 1e3) / 1e9
    text = (f"Roofline in the same run ({start['threads']} thread(s), {start['n']}^3 matmul, "
            f"best of 3, start -> end; wall-clock): fp32 {start['float32_gflops']:.0f} -> "
            f"{end['float32_gflops']:.0f} GFLOP/s, bf16 {start['bfloat16_gflops']:.0f} -> "
            f"{end['bfloat16_gflops']:.0f} GFLOP/s, copy {start['copy_bandwidth_gb_s']:.1f} -> "
            f"{end['copy_bandwidth_gb_s']:.1f} GB/s")
    if cpu:
        text += (f"; in thread CPU time: fp32 {start['float32_gflops_cpu_time']:.0f} -> "
                 f"{end['float32_gflops_cpu_time']:.0f}, bf16 "
                 f"{start['bfloat16_gflops_cpu_time']:.0f} -> "
                 f"{end['bfloat16_gflops_cpu_time']:.0f} GFLOP/s")
    return (text + f". The base at {_cell_name(big)} runs at {achieved:.0f} GFLOP/s "
            f"({achieved / end[rate]:.0%} of the {dtype} matmul rate at the end"
            f"{', same clock' if cpu else ''}): that cell is compute-bound, where an added "
            f"module costs about its FLOPs; the single-sequence cells are not.")


def tables(result: dict) -> str:
    lat = result["latency"]
    return "\n\n".join(x for x in (latency_table(lat), sweep_table(lat),
                                   checkpoint_table(result["checkpoint"])) if x)


def plot(result: dict, path: Path) -> Path | None:
    """Latency and % over base vs batch size at sequence 128 (appendix B's axis)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    lat = result["latency"]
    cells = _sweep_cells(lat)
    if len(cells) < 2:
        return None
    batches = [c["batch"] for c in cells]
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, name in enumerate(cells[0]["variants"]):
        color = colors[i % len(colors)]
        ms = [c["variants"][name]["median_ms"] for c in cells]
        left.plot(batches, ms, marker="o", color=color, label=label(name, lat))
        if name != "base":
            pct = [c["variants"][name]["pct_over_base"] for c in cells]
            quartiles = [ratio_quartiles(c, name) for c in cells]
            right.errorbar(batches, pct, yerr=[[max(p - q[0], 0) for p, q in zip(pct, quartiles)],
                                               [max(q[1] - p, 0) for p, q in zip(pct, quartiles)]],
                           marker="o", capsize=3, color=color, label=label(name, lat))
    m = lat["model"]
    for ax in (left, right):
        ax.set_xscale("log", base=2)
        ax.set_xticks(batches, [str(b) for b in batches])
        ax.set_xlabel(f"batch size (sequence {SWEEP_SEQ})")
        ax.grid(alpha=0.3)
    left.set_yscale("log")
    left.yaxis.set_major_formatter(matplotlib.ticker.ScalarFormatter())
    left.legend(fontsize=7)
    left.set_ylabel("forward, ms (median; " + ("thread CPU time)" if lat.get("clock") == "cpu"
                                                else "wall-clock)"))
    right.axhline(0, color="black", lw=0.8)
    right.set_ylabel("% over base (median ratio; bars: quartiles)")
    # one legend (left) for both panels: the colors are the same
    fig.suptitle(f"One forward, {m['layers']} GPT-2-medium-shaped layers (hidden {m['hidden']}, "
                 f"FFN {m['intermediate']}), {m['dtype']}, {m['threads']} thread(s), CPU",
                 fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def paper_block(result: dict, figure: str | None) -> str:
    lat, m = result["latency"], result["latency"]["model"]
    added = {n: v["added_params"] for n, v in lat["variants"].items() if v["added_params"]}
    lines = [
        "<!-- bench efficiency: begin -->",
        f"Generated by `{result['command']}` (data: `docs/results/efficiency.json`; re-render "
        f"with `lorafleet bench efficiency --from-json docs/results/efficiency.json --paper "
        f"docs/paper.md`) on {result['machine']}, load average {result['load_average'][0]:.1f} "
        f"-> {result['load_average'][1]:.1f} (a shared machine), {result['seconds'] / 60:.1f} "
        f"min.",
        "",
        "**Inference latency (Table 1's shape).** One forward pass of a random-weight model with "
        f"GPT-2 medium's layer shape: {m['layers']} layers (GPT-2 medium has "
        f"{m['layers_gpt2_medium']}; the % over base is a per-layer quantity), hidden "
        f"{m['hidden']}, {m['heads']} heads, FFN {m['intermediate']}, vocab {m['vocab']}, "
        f"{m['params_per_layer']:,} parameters per layer; {m['dtype']}, {m['threads']} torch "
        f"thread(s); LM head left out (same time for every variant). Variants run interleaved, "
        f"order rotating each round; {_clock_text(lat)} ms are median ± std over the rounds, % "
        f"is the median of the per-round ratios to the base. Added parameters: "
        + ", ".join(f"{label(n, lat)} {v:,}" for n, v in added.items())
        + f". LoRA's B and the adapters' up-projections are random (non-zero), as after "
        f"training. {roofline_text(result)}",
        "",
        latency_table(lat),
        "",
        sweep_table(lat) + "\n\n(in brackets: the quartiles of the per-round ratios, %)",
        "",
        verdict(lat),
    ]
    if figure:
        lines += ["", f"![forward latency and % over base vs batch size]({figure})"]
    lines += ["", "**Training step time and memory, LoRA vs full fine-tuning (sec. 4.2).**", "",
              *training_lines(result.get("training")), "",
              "**Checkpoint size (sec. 4.2).** PEFT adapters of the embedded base written by "
              "`lorafleet.save_adapter` (fp32), sizes on disk; the safetensors header is the "
              "difference from 4 bytes x parameters.", "",
              checkpoint_table(result["checkpoint"]), "",
              "The GPT-3 arithmetic (computed in `bench/efficiency.py`, `gpt3_arithmetic`):", "",
              *gpt3_lines(result["gpt3"]),
              "<!-- bench efficiency: end -->"]
    return "\n".join(lines)
