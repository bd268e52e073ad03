"""The LoRA paper's comparison at small scale (its Tables 2-3 and, for the which-matrices
question, Table 5), on the embedded base model and the E2E-style data-to-text task.

Every method trains with the same loop (lorafleet.train) on the same data for the same number
of steps, then greedily completes the same held-out prompts, scored with corpus BLEU against all
references. Each run is a child process so that its peak resident memory (ru_maxrss, from
os.wait4) is its own; that figure includes the Python + torch runtime (~0.3-0.4 GB), so the
`state MB` column gives the part the methods differ in: weights + gradients + AdamW state.

    lorafleet bench methods [--steps 120] [--quick] [--paper docs/paper.md]
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

# (label, TrainConfig overrides). Learning rates: 1e-2 for the small-parameter methods, as in
# the demo (3e-3 was too low to learn copying in a few hundred steps on the embedded model);
# full fine-tuning 3e-4 (every weight moves); virtual tokens train best higher.
PAPER_ROWS = [
    ("full fine-tuning", {"method": "full", "lr": 3e-4}),
    ("BitFit", {"method": "bitfit", "lr": 1e-2}),
    ("prompt tuning (8 tokens)", {"method": "prompt", "virtual_tokens": 8, "lr": 3e-2}),
    ("prefix tuning (8 tokens)", {"method": "prefix", "virtual_tokens": 8, "lr": 3e-2}),
    ("adapter (bottleneck 16)", {"method": "adapter", "bottleneck": 16, "lr": 1e-2}),
    *[(f"LoRA q,v r={r}", {"method": "lora", "targets": "q,v", "r": r, "alpha": 2 * r,
                           "lr": 1e-2}) for r in (1, 2, 4, 8, 64)],
    ("LoRA all-linear r=8", {"method": "lora", "targets": "all-linear", "r": 8, "alpha": 16,
                             "lr": 1e-2}),
    ("QLoRA all-linear r=8 (NF4 base)", {"method": "qlora", "targets": "all-linear", "r": 8,
                                         "alpha": 16, "lr": 1e-2}),
]
# LoRA paper sec. 7.2 compares two random seeds of the same configuration.
SEED_ROW = ("LoRA q,v r=8 (seed 1)", {"method": "lora", "targets": "q,v", "r": 8, "alpha": 16,
                                      "lr": 1e-2, "seed": 1})
# LoRA paper Table 5: a fixed budget; one matrix at r=8, two at r=4, four at r=2.
MATRIX_ROWS = [
    (f"W{t} r={r}", {"method": "lora", "targets": targets, "r": r, "alpha": 2 * r, "lr": 1e-2})
    for t, targets, r in [("q", "q", 8), ("k", "k", 8), ("v", "v", 8), ("o", "o", 8),
                          ("q,Wk", "q,k", 4), ("q,Wv", "q,v", 4), ("q,Wk,Wv,Wo", "q,k,v,o", 2)]
]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--base", type=Path, default=None, help="base model (default: embedded)")
    parser.add_argument("--steps", type=int, default=120)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--n-train", type=int, default=2000)
    parser.add_argument("--n-test", type=int, default=30)
    parser.add_argument("--max-tokens", type=int, default=40)
    parser.add_argument("--only", default="", help="comma-separated row labels (substring match)")
    parser.add_argument("--skip-matrices", action="store_true")
    parser.add_argument("--quick", action="store_true", help="a few steps and prompts per row")
    parser.add_argument("--json", type=Path, default=None, help="write all results as JSON")
    parser.add_argument("--paper", type=Path, default=None, help="write the markdown tables here "
                        "(e.g. docs/paper.md)")
    parser.add_argument("--work", type=Path, default=None,
                        help="keep data and every run's artifact here (default: a temp folder)")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)


# ---------------------------------------------------------------- one run (in a child process)

def greedy_complete(model, tokenizer, prompt: str, max_tokens: int) -> str:
    """Greedy decoding by re-running the whole sequence each token: works for every method's
    module (prefix and prompt tuning wrap the model, so no KV cache), and the sequences are
    short. Stops at EOS or the end of the line."""
    import torch

    ids = tokenizer.encode(prompt)
    new: list[int] = []
    with torch.inference_mode():
        for _ in range(max_tokens):
            out = model(torch.tensor([ids + new]))
            logits = out.logits if hasattr(out, "logits") else out
            token = int(logits[0, -1].argmax())
            if token == tokenizer.eos_token_id:
                break
            new.append(token)
            if "\n" in tokenizer.decode(new):
                break
    return tokenizer.decode(new)


def run_one(spec: dict) -> dict:
    import torch

    from lorafleet.demo.tasks import make_split, score
    from lorafleet.models import load_tokenizer
    from lorafleet.train.trainer import TrainConfig, train

    work = Path(spec["work"])
    train_file = work / "e2e.train.jsonl"
    test = make_split("e2e", "test", spec["n_test"], seed=0)
    tcfg = TrainConfig.from_flat(model=spec["base"], data=str(train_file), out=spec["out"],
                                 steps=spec["steps"], batch_size=spec["batch_size"],
                                 warmup=10, bf16=True, max_len=128, overwrite=True, device="cpu",
                                 **{"seed": 0, **spec["overrides"]})
    t0 = time.perf_counter()
    result = train(tcfg)
    train_s = time.perf_counter() - t0
    model = result.model.eval()
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    # weights (any dtype, incl. packed NF4 buffers) + fp32 grads and two AdamW moments
    weight_bytes = sum(t.numel() * t.element_size()
                       for t in [*model.parameters(), *model.buffers()])
    state_bytes = weight_bytes + trainable * 4 * 3
    tokenizer = load_tokenizer(spec["base"])
    t0 = time.perf_counter()
    outputs = [greedy_complete(model, tokenizer, e.prompt, spec["max_tokens"]) for e in test]
    return {"trainable": trainable, "bleu": score("e2e", outputs, test),
            "train_loss": result.loss, "train_s": train_s,
            "ms_per_step": 1000 * train_s / max(1, result.steps), "eval_s":
                time.perf_counter() - t0, "state_mb": state_bytes / 2**20,
            "sample": outputs[0].strip(), "torch_threads": torch.get_num_threads()}


def run_child(label: str, overrides: dict, common: dict) -> dict:
    """Run one row in a child process; returns its results plus its peak RSS."""
    slug = "".join(c if c.isalnum() else "-" for c in label.lower()).strip("-")
    spec = {**common, "overrides": overrides, "out": str(Path(common["work"]) / "runs" / slug)}
    out_file = Path(common["work"]) / "result.json"
    out_file.unlink(missing_ok=True)
    err_file = Path(common["work"]) / "stderr.txt"
    with err_file.open("w") as err:
        proc = subprocess.Popen([sys.executable, "-m", "lorafleet.bench.methods", "--child",
                                 json.dumps(spec)], stdout=subprocess.DEVNULL, stderr=err)
        # wait4, not wait: it returns this child's own resource usage (peak RSS).
        _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0 or not out_file.is_file():
        lines = err_file.read_text().strip().splitlines()
        return {"label": label, "error": lines[-1] if lines else f"exit {proc.returncode}"}
    result = json.loads(out_file.read_text())
    return {"label": label, **overrides, **result, "peak_rss_mb": usage.ru_maxrss / 1024,
            "artifact": str(Path(spec["out"]) / "adapter")}


# ---------------------------------------------------------------- the tables

def _table(rows: list[dict]) -> list[str]:
    lines = ["| method | trainable params | BLEU | train loss | peak RSS MB | state MB | "
             "s / step | train s |", "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['label']} | - | - | - | - | - | - | failed: {r['error'][:80]} |")
            continue
        lines.append(f"| {r['label']} | {r['trainable']:,} | {r['bleu']:.1f} | "
                     f"{r['train_loss']:.3f} | {r['peak_rss_mb']:.0f} | {r['state_mb']:.1f} | "
                     f"{r['ms_per_step'] / 1000:.2f} | {r['train_s']:.0f} |")
    return lines


def run(args) -> int:
    if args.child:
        spec = json.loads(args.child)
        result = run_one(spec)
        (Path(spec["work"]) / "result.json").write_text(json.dumps(result))
        return 0

    from lorafleet.demo.pipeline import default_base_model
    from lorafleet.demo.tasks import make_split, write_jsonl

    if args.quick:
        args.steps, args.n_test, args.n_train, args.max_tokens = 5, 3, 64, 8
    base = str(args.base or default_base_model())
    work = args.work or Path(tempfile.mkdtemp(prefix="lorafleet-bench-methods-"))
    work.mkdir(parents=True, exist_ok=True)
    write_jsonl(work / "e2e.train.jsonl", make_split("e2e", "train", args.n_train, seed=0))
    common = {"base": base, "work": str(work), "steps": args.steps,
              "batch_size": args.batch_size, "n_test": args.n_test,
              "max_tokens": args.max_tokens}
    only = [s.strip() for s in args.only.split(",") if s.strip()]
    tables = {"methods": PAPER_ROWS, "matrices": [] if args.skip_matrices else MATRIX_ROWS,
              "analysis": [SEED_ROW]}
    results: dict[str, list[dict]] = {}
    for table, rows in tables.items():
        for label, overrides in rows:
            if only and not any(s in label for s in only):
                continue
            print(f"[{table}] {label} ...", end=" ", flush=True)
            r = run_child(label, overrides, common)
            results.setdefault(table, []).append(r)
            print(f"failed: {r['error']}" if "error" in r else
                  f"BLEU {r['bleu']:.1f}, {r['trainable']:,} trainable, {r['train_s']:.0f} s, "
                  f"peak RSS {r['peak_rss_mb']:.0f} MB; e.g. {r['sample'][:70]!r}", flush=True)
    for table, rows in results.items():
        print(f"\n{table}:")
        print("\n".join(_table(rows)))
    command = "lorafleet bench methods " + " ".join(
        a for a in sys.argv[3:] if not a.startswith("--child"))
    if args.json:
        args.json.write_text(json.dumps({"command": command, "config": common, "results":
                                         results}, indent=1) + "\n")
    analysis = None
    if args.paper:
        analysis = run_analyses(results, args.paper.parent / "figures")
        write_paper_section(args.paper, results, common, command, analysis)
        print(f"wrote {args.paper}")
    return 0


PAPER_BEGIN, PAPER_END = "<!-- bench methods: begin -->", "<!-- bench methods: end -->"


def _artifact(results: dict, label: str) -> Path | None:
    for rows in results.values():
        for r in rows:
            if r["label"] == label and "error" not in r:
                return Path(r["artifact"])
    return None


def run_analyses(results: dict, figures: Path) -> list[str]:
    """The sec. 7 analyses on the trained adapters: phi(A_r=8, A_r=64) and phi across two seeds
    (heat maps), and the amplification factor of r=8 vs r=64 (the paper's Table 7)."""
    from lorafleet.analysis import plots
    from lorafleet.analysis.report import (analyze_adapter, base_weights_for, compare_adapters,
                                           load_lora_factors)
    from lorafleet.demo.pipeline import default_base_model
    from lorafleet.models import load_model

    r8, r64 = _artifact(results, "LoRA q,v r=8"), _artifact(results, "LoRA q,v r=64")
    seed1 = _artifact(results, SEED_ROW[0])
    lines: list[str] = []
    if not (r8 and r64 and seed1):
        return lines
    f8, f64, fs = load_lora_factors(r8), load_lora_factors(r64), load_lora_factors(seed1)
    figures.mkdir(parents=True, exist_ok=True)
    pairs = [("phi_r8_r64.png", "phi(A_r=8, A_r=64, i, j)", compare_adapters(f8, f64)),
             ("phi_seed0_seed1.png", "phi(A_r=8 seed 0, A_r=8 seed 1, i, j)",
              compare_adapters(f8, fs))]
    # Two random subspaces of dimension i and j in R^d: E[phi] = max(i, j) / d.
    d = f8[next(iter(f8))].lora_a.shape[1]
    lines += [f"Random-subspace baseline: E[phi(i, j)] = max(i, j) / d with d = {d}, so "
              f"phi(1, 1) = {1 / d:.3f} and phi(8, 64) = {64 / d:.3f} by chance.", "",
              "| pair | module | phi(1,1) | mean phi over i<=8, j<=8 | mean phi, all (i, j) |",
              "|---|---|---:|---:|---:|"]
    for png, title, pair in pairs:
        plots.phi_heatmaps(pair.grids, figures / png, title=title)
        for name, grid in pair.grids.items():
            lines.append(f"| {title} | {name} | {grid[0, 0]:.3f} | {grid[:8, :8].mean():.3f} | "
                         f"{grid.mean():.3f} |")
    lines += ["", "Heat maps: " + ", ".join(f"![{t}](figures/{p})" for p, t, _ in pairs), ""]
    model = load_model(default_base_model())
    lines += ["| adapter | module | r | amplification ‖dW‖ / ‖UᵀWVᵀ‖ | ‖UᵀWVᵀ‖ | "
              "same for a random W | ‖dW‖ |", "|---|---|---:|---:|---:|---:|---:|"]
    for label, factors in (("r=8", f8), ("r=64", f64)):
        rows = analyze_adapter(factors, base_weights_for(model, factors))
        for m in rows:
            lines.append(f"| {label} | {m.module} | {m.rank} | {m.amplification:.2f} | "
                         f"{m.weight_projection_norm:.3f} | {m.random_projection_norm:.3f} | "
                         f"{m.delta_norm:.3f} |")
        plots.spectra({m.module: m.singular_values for m in rows},
                      figures / f"spectra_{label.replace('=', '')}.png",
                      title=f"dW singular values, LoRA q,v {label}")
    lines += ["", "Spectra: ![r=8](figures/spectra_r8.png) ![r=64](figures/spectra_r64.png)", ""]
    return lines


def write_paper_section(path: Path, results: dict, common: dict, command: str,
                        analysis: list[str] | None = None) -> None:
    """Replace the generated block of `path` (between the markers) with fresh tables."""
    lines = [PAPER_BEGIN, "", f"Command: `{command.strip()}` (2-core CPU, no GPU; "
             f"{common['steps']} steps of {common['batch_size']} examples per row, BLEU on "
             f"{common['n_test']} held-out MRs).", ""]
    if results.get("methods"):
        lines += ["**Methods** (LoRA paper Tables 2-3, E2E-style data-to-text):", "",
                  *_table(results["methods"]), ""]
    if results.get("matrices"):
        lines += ["**Which weight matrices** (LoRA paper Table 5, fixed budget: 1 matrix r=8, "
                  "2 matrices r=4, 4 matrices r=2):", "", *_table(results["matrices"]), ""]
    if analysis:
        lines += ["**Sec. 7 analyses** on the trained data-to-text adapters (q,v):", "",
                  *analysis]
    lines.append(PAPER_END)
    from lorafleet.bench.doc_block import replace_block
    replace_block(path, PAPER_BEGIN, PAPER_END, "\n".join(lines))


if __name__ == "__main__":
    p = argparse.ArgumentParser()
    add_arguments(p)
    sys.exit(run(p.parse_args()))
