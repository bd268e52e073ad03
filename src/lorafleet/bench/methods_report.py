"""docs/paper.md's `bench methods` block, rendered from the run's JSON alone (so that
`lorafleet bench methods --from-json docs/results/methods.json --paper docs/paper.md` redraws
the tables and figures without training anything)."""
from __future__ import annotations

from pathlib import Path

from lorafleet.analysis.stats import Interval, mean_ci
from lorafleet.bench import methods_sec7
from lorafleet.bench.doc_block import markers
from lorafleet.bench.methods_studies import (ALPHA, LORA_IN_METHODS, LORA_LR, Plan,
                                             default_plan, lora, make_run, quick_plan, select)

PAPER_BEGIN, PAPER_END = markers("methods")


def plan_of(config: dict) -> Plan:
    plan = quick_plan() if config.get("quick") else default_plan()
    plan.seeds = tuple(config["seeds"])
    plan.steps = config["steps"]
    plan.sec7_steps = config["sec7_steps"]
    return plan


def _ok(results: dict, runs) -> list[dict]:
    return [results[r.key] for r in runs if r.key in results and "error" not in results[r.key]]


def _errors(results: dict, runs) -> list[str]:
    return [results[r.key]["error"] for r in runs
            if r.key in results and "error" in results[r.key]]


def interval(rows: list[dict], key: str) -> Interval | None:
    return mean_ci([r[key] for r in rows]) if rows else None


def _ci_text(iv: Interval | None, n_wanted: int) -> str:
    if iv is None:
        return "-"
    return str(iv) + ("" if iv.n == n_wanted else f" (n={iv.n})")


def _mean(rows: list[dict], key: str, fmt: str) -> str:
    values = [r[key] for r in rows if r.get(key) is not None]
    return format(sum(values) / len(values), fmt) if values else "-"


def lora_table(results: dict, plan: Plan, cells) -> list[str]:
    n = len(plan.seeds)
    lines = [f"| weights | r | trainable params | test BLEU (mean ± 95% CI, n={n}) | "
             "val BLEU | train loss | val loss |", "|---|---:|---:|---:|---:|---:|---:|"]
    for weights, r in cells:
        runs = [make_run(lora(weights, r), s, plan.steps) for s in plan.seeds]
        ok, errors = _ok(results, runs), _errors(results, runs)
        params = f"{ok[0]['trainable']:,}" if ok else "-"
        note = f" ({len(errors)} failed: {errors[0][:60]})" if errors else ""
        lines.append(f"| {weights} | {r} | {params} | {_ci_text(interval(ok, 'bleu'), n)}{note} | "
                     f"{_mean(ok, 'val_bleu', '.1f')} | {_mean(ok, 'train_loss', '.3f')} | "
                     f"{_mean(ok, 'val_loss', '.3f')} |")
    return lines


def methods_tables(results: dict, plan: Plan) -> tuple[list[str], list[str]]:
    """(the methods table with each baseline's selected configuration, the sweeps table)."""
    n = len(plan.seeds)
    main = [f"| method | configuration (selected on val) | trainable params | "
            f"test BLEU (mean ± 95% CI, n={n}) | val BLEU | train loss | s / step | "
            "peak RSS MB | state MB |", "|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    sweep = ["| method | configuration | trainable params | val BLEU | test BLEU | |",
             "|---|---|---:|---:|---:|---|"]

    def row(label, config, ok):
        if not ok:
            return f"| {label} | {config} | - | - | - | - | - | - | - |"
        return (f"| {label} | {config} | {ok[0]['trainable']:,} | "
                f"{_ci_text(interval(ok, 'bleu'), n)} | {_mean(ok, 'val_bleu', '.1f')} | "
                f"{_mean(ok, 'train_loss', '.3f')} | {_mean(ok, 'ms_per_step', '.0f')} ms | "
                f"{_mean(ok, 'peak_rss_mb', '.0f')} | {_mean(ok, 'state_mb', '.1f')} |")

    for label, configs in plan.sweeps:
        best = select(configs, results, plan)
        for i, (config, overrides) in enumerate(configs):
            r = results.get(make_run(overrides, plan.seeds[0], plan.steps).key)
            if r is None:
                sweep.append(f"| {label} | {config} | - | - | - | not run |")
            elif "error" in r:
                sweep.append(f"| {label} | {config} | - | - | - | failed: {r['error'][:60]} |")
            else:
                sweep.append(f"| {label} | {config} | {r['trainable']:,} | {r['val_bleu']:.1f} | "
                             f"{r['bleu']:.1f} | {'selected' if i == best else ''} |")
        if best is None:
            main.append(row(label, "-", []))
            continue
        config, overrides = configs[best]
        ok = _ok(results, [make_run(overrides, s, plan.steps) for s in plan.seeds])
        main.append(row(label, config, ok))
    for weights, r in LORA_IN_METHODS:
        ok = _ok(results, [make_run(lora(weights, r), s, plan.steps) for s in plan.seeds])
        main.append(row(f"LoRA {weights} r={r}", f"alpha {ALPHA:g}, lr {LORA_LR:g} (not tuned)",
                        ok))
    return main, sweep


def convergence_table(results: dict, plan: Plan) -> list[str]:
    runs = plan.sec7_runs()
    done = {name: results[r.key] for name, r in runs.items()
            if r.key in results and "error" not in results[r.key]}
    if not done:
        return []
    steps = [e["step"] for e in next(iter(done.values()))["evals"]]
    lines = ["| adapter | " + " | ".join(f"step {s}" for s in steps) + " | test BLEU |",
             "|---|" + "---:|" * (len(steps) + 1)]
    for name, r in done.items():
        cells = [f"{e['train_loss']:.3f} / {e['eval_loss']:.3f}" for e in r["evals"]]
        lines.append(f"| Wq,Wv {name} | " + " | ".join(cells) + f" | {r['bleu']:.1f} |")
    return lines


def render(data: dict, figure_dir: Path | None, figure_link: str = "figures") -> str:
    """The whole block (markers included); writes the sec. 7 PNGs into `figure_dir`."""
    config, results = data["config"], data["runs"]
    plan = plan_of(config)
    timing = data.get("timing", {})
    wall = timing.get("wall_s_total")
    lines = [PAPER_BEGIN, "", f"Command: `{data['command']}`; results in "
             f"`docs/results/methods.json`, this block regenerated from it by "
             f"`lorafleet bench methods --from-json docs/results/methods.json --paper "
             f"docs/paper.md`.", "",
             f"Setup: {config['steps']} steps of {config['batch_size']} examples per run "
             f"(cosine schedule, 10 warmup steps), {config['n_train']:,} training MRs; BLEU on "
             f"{config['n_val']} validation and {config['n_test']} test MRs (disjoint from each "
             f"other and from training); seeds {', '.join(map(str, config['seeds']))}; "
             f"{config['jobs']} runs at a time, {config['threads']} torch thread(s) each. "
             f"LoRA: alpha = {ALPHA:g} at every rank (scale alpha/r), lr {LORA_LR:g}, never "
             f"tuned. Wall time: "
             + (f"{wall / 60:.0f} min for {timing.get('runs_total', '?')} runs "
                f"({len(timing.get('invocations', []))} invocation(s)) on "
                f"{config.get('cpus', '?')} shared CPU cores, no GPU, other jobs running."
                if wall else "not recorded."), ""]
    missing = data.get("missing") or []
    if missing:
        lines += [f"**Incomplete:** {len(missing)} planned run(s) missing: "
                  + "; ".join(missing[:6]) + (" ..." if len(missing) > 6 else ""), ""]
    main, sweep = methods_tables(results, plan)
    lines += ["**Methods** (LoRA paper Tables 2-3; each baseline's best configuration on the "
              "validation split, reported on test):", "", *main, "",
              "Sweeps (seed 0; the selected row has the best val BLEU):", "", *sweep, "",
              "**Which weight matrices** (LoRA paper Table 5: a fixed budget, one matrix at "
              "r=8, two at r=4, four at r=2):", "",
              *lora_table(results, plan, plan.budget_cells), "",
              "**Rank** (LoRA paper Table 6):", "",
              *lora_table(results, plan, plan.rank_cells()), ""]
    conv = convergence_table(results, plan)
    if conv:
        lines += [f"**Sec. 7 adapters** (Wq,Wv, {plan.sec7_steps} steps each; mean train loss "
                  "over the last 20 steps / validation loss, at each evaluation):", "", *conv,
                  ""]
    if data.get("sec7"):
        names = methods_sec7.figures(data["sec7"], figure_dir) if figure_dir else []
        lines += ["**Sec. 7 analyses** (Figure 3: r=8 vs r=64; Figure 4: two seeds of r=64; "
                  "Wq and Wv of every layer; `random Gaussian`: two random matrices of the same "
                  "shapes):", "", *methods_sec7.tables(data["sec7"], names, figure_link), ""]
    lines.append(PAPER_END)
    return "\n".join(lines)


def write_paper_section(path: Path, data: dict, figure_dir: Path | None = None) -> None:
    from lorafleet.bench.doc_block import replace_block

    replace_block(path, PAPER_BEGIN, PAPER_END, render(data, figure_dir))
