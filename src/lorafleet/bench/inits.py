"""Do PiSSA, OLoRA and LoftQ converge faster than the default LoRA init? (issue 20 item 2)

Every run trains one LoRA adapter (same targets, rank, lr, steps and batches) on the embedded
base for one demo task, from one initialization, and records the training loss of every step
and the held-out loss before training and at the end. Each init runs with several seeds; a seed
fixes both the random part of the init (A's kaiming draw, pissa_niter's random projection) and
the order of the batches, and the same seed gives every init the same batches, so curves are
paired. The float-base inits (default, pissa, pissa_niter_N, olora) are compared with each other;
LoftQ is compared with plain QLoRA (the default init over the NF4 base), both over the same NF4
quantizer. alpha = r (scaling 1), where LoftQ's fold of the quantization error is exact.

The loop is a plain one (AdamW, linear warmup then constant lr, fp32 on CPU), not
`lorafleet.train.train`: `train` does not take a LoftQ model (LoftQ needs the float weights and
quantizes them itself). It reuses train's batching and loss (forward_logits, loss_sum).

    python -m lorafleet.bench.inits [--steps 80] [--seeds 3] [--quick] \
        [--json docs/results/inits.json] [--figure docs/figures/inits_loss.png] \
        [--paper docs/paper.md]
    python -m lorafleet.bench.inits --from-json docs/results/inits.json ... --paper docs/paper.md
"""
from __future__ import annotations

import argparse
import json
import logging
import random
import sys
import time
from pathlib import Path

from lorafleet.bench.doc_block import markers

log = logging.getLogger(__name__)

# label -> (base: "float" or "nf4", init_lora_weights); loftq is built by quant.loftq.loftq_model
INITS = {
    "default": ("float", True),
    "pissa": ("float", "pissa"),
    "pissa_niter_4": ("float", "pissa_niter_4"),
    "olora": ("float", "olora"),
    "qlora": ("nf4", True),
    "loftq": ("nf4", "loftq"),
}
REFERENCE = {"float": "default", "nf4": "qlora"}
PAPER_BEGIN, PAPER_END = markers("inits")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--base", type=Path, default=None, help="base model (default: embedded)")
    parser.add_argument("--task", default="json", help="demo task (lorafleet.demo.tasks)")
    parser.add_argument("--inits", default=",".join(INITS), help="comma-separated labels")
    parser.add_argument("--steps", type=int, default=80)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--lr", type=float, default=1e-2)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--r", type=int, default=8)
    parser.add_argument("--targets", default="q_proj,k_proj,v_proj,o_proj")
    parser.add_argument("--n-train", type=int, default=1000)
    parser.add_argument("--n-test", type=int, default=64)
    parser.add_argument("--max-len", type=int, default=96)
    parser.add_argument("--threads", type=int, default=1,
                        help="torch CPU threads (1: on a shared 2-core machine more threads "
                        "spin against the other processes and each step gets slower)")
    parser.add_argument("--quick", action="store_true", help="a few steps, one seed")
    parser.add_argument("--json", type=Path, default=None, help="write all results as JSON")
    parser.add_argument("--figure", type=Path, default=None, help="write the loss-curve PNG")
    parser.add_argument("--paper", type=Path, default=None,
                        help="write the markdown section here (e.g. docs/paper.md)")
    parser.add_argument("--from-json", type=Path, nargs="+", default=None,
                        help="no training: write the --paper section from these study JSONs "
                        "(their figures as recorded in them)")


# ---------------------------------------------------------------- one run

def build_model(base: str, label: str, r: int, targets: list[str]):
    """The base with adapter "default" injected by `label`'s init (fp32, LoRA params trainable)."""
    from lorafleet.lora.config import LoraConfig
    from lorafleet.lora.inject import inject_lora
    from lorafleet.models import load_model
    from lorafleet.quant.loftq import loftq_model
    from lorafleet.quant.model import quantize_model

    kind, init = INITS[label]
    model = load_model(base)
    config = LoraConfig(r=r, lora_alpha=r, target_modules=targets, init_lora_weights=init)
    if init == "loftq":
        return loftq_model(model, config)
    if kind == "nf4":
        quantize_model(model)
    return inject_lora(model, config)


def run_one(label: str, seed: int, train_set: list, test_set: list, cfg: dict) -> dict:
    """Train one (init, seed); returns per-step train losses and held-out losses."""
    import torch

    from lorafleet.train.trainer import count_targets, evaluate, forward_logits, loss_sum

    random.seed(seed)
    torch.manual_seed(seed)
    model = build_model(cfg["base"], label, cfg["r"], cfg["targets"])
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg["lr"], weight_decay=0.0)
    device = torch.device("cpu")
    pad_id = cfg["pad_id"]

    def held_out() -> float:
        loss = evaluate(model, test_set, 32, pad_id, device)
        model.train()  # training mode from the first evaluation on, as the loop wants
        return loss

    # the batch order: one permutation per seed, the same for every init
    order = random.Random(seed).sample(range(len(train_set)), len(train_set))
    eval_start = held_out()
    losses = []
    t0 = time.perf_counter()
    for step in range(cfg["steps"]):
        for group in optimizer.param_groups:
            group["lr"] = cfg["lr"] * min(1.0, (step + 1) / max(1, cfg["warmup"]))
        start = (step * cfg["batch_size"]) % len(order)
        batch = [train_set[order[(start + j) % len(order)]] for j in range(cfg["batch_size"])]
        loss = loss_sum(*forward_logits(model, batch, pad_id, device)) / max(
            1, count_targets(batch))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
    train_s = time.perf_counter() - t0
    return {"init": label, "seed": seed, "train_loss": losses, "eval_loss_start": eval_start,
            "eval_loss_end": held_out(), "train_s": train_s,
            "trainable": sum(p.numel() for p in params)}


# ---------------------------------------------------------------- summary

TARGET_LOSS = 1.0   # "steps to reach": where the curves of the json task are still steep
SMOOTH = 5          # steps in the trailing mean that decides it (one batch is noisy)


def steps_to_reach(curve: list[float], target: float = TARGET_LOSS) -> int | None:
    """First step (1-based) whose trailing SMOOTH-step mean training loss is below `target`."""
    for i in range(len(curve)):
        window = curve[max(0, i + 1 - SMOOTH):i + 1]
        if sum(window) / len(window) < target:
            return i + 1
    return None


def summarize(runs: list[dict]) -> dict[str, dict]:
    """Per init: mean / min / max over seeds of the mean training loss over all steps (the area
    under the curve: lower = converged faster), of the last 10 steps' loss, and of the held-out
    loss at the end; and a verdict against the reference init of the same base, "faster" /
    "slower" only where the seed ranges of the area do not overlap."""
    by_init: dict[str, list[dict]] = {}
    for r in runs:
        by_init.setdefault(r["init"], []).append(r)

    def stats(values: list[float]) -> dict:
        return {"mean": sum(values) / len(values), "min": min(values), "max": max(values)}

    out = {}
    for label, rs in by_init.items():
        out[label] = {
            "seeds": len(rs),
            "auc": stats([sum(r["train_loss"]) / len(r["train_loss"]) for r in rs]),
            "steps_to_target": stats([steps_to_reach(r["train_loss"]) or
                                      len(r["train_loss"]) + 1 for r in rs]),
            "last10": stats([sum(r["train_loss"][-10:]) / len(r["train_loss"][-10:])
                             for r in rs]),
            "eval_start": stats([r["eval_loss_start"] for r in rs]),
            "eval_end": stats([r["eval_loss_end"] for r in rs]),
            "train_s": stats([r["train_s"] for r in rs]),
        }
    for label, s in out.items():
        ref = REFERENCE[INITS[label][0]]
        if label == ref or ref not in out:
            s["verdict"] = "reference"
            continue
        a, b = s["auc"], out[ref]["auc"]
        s["verdict"] = ("faster" if a["max"] < b["min"] else "slower" if a["min"] > b["max"]
                        else "within seed spread")
        s["vs"] = ref
    return out


def plot_curves(runs: list[dict], path: Path, title: str) -> Path:
    """Mean training loss per step with the min-max band over seeds; one panel per base."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    panels = [k for k in ("float", "nf4") if any(INITS[r["init"]][0] == k for r in runs)]
    fig, axes = plt.subplots(1, len(panels), figsize=(6.2 * len(panels), 4.2), squeeze=False)
    for ax, kind in zip(axes[0], panels):
        for label in [lb for lb in INITS if INITS[lb][0] == kind]:
            curves = np.array([r["train_loss"] for r in runs if r["init"] == label])
            if not len(curves):
                continue
            steps = np.arange(1, curves.shape[1] + 1)
            line, = ax.plot(steps, curves.mean(0), label=f"{label} ({len(curves)} seeds)")
            ax.fill_between(steps, curves.min(0), curves.max(0), alpha=0.2,
                            color=line.get_color())
        ax.set_xlabel("step")
        ax.set_ylabel("training loss (nats / token)")
        ax.set_title("float base" if kind == "float" else "NF4 base")
        ax.set_yscale("log")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _title(c: dict) -> str:
    return (f"LoRA init vs convergence: {c['task']}, r={c['r']}, lr {c['lr']:g}, "
            f"batch {c['batch_size']}")


def _fmt(s: dict) -> str:
    return f"{s['mean']:.3f} ({s['min']:.3f}-{s['max']:.3f})"


def section_lines(studies: list[tuple[dict, str | None]]) -> list[str]:
    """The docs/paper.md block (between the markers): one table (and figure) per study, each a
    (JSON data, figure path relative to the paper) pair."""
    lines = [PAPER_BEGIN]
    for data, figure in studies:
        lines += ["", *_study_lines(data, figure)]
    lines += ["", f"Steps to train loss < {TARGET_LOSS:g}: the first step whose trailing "
              f"{SMOOTH}-step mean is below it (mean, min-max over seeds).",
              "\"faster\" / \"slower\": the seed ranges of the mean training loss over all "
              "steps (the area under the curve) do not overlap those of the reference init on "
              "the same base (default for the float base, QLoRA's default init for NF4).", "",
              PAPER_END]
    return lines


def _study_lines(data: dict, figure: str | None) -> list[str]:
    cfg, summary = data["config"], data["summary"]
    lines = [f"Command: `{data['command']}` (2-core CPU, no GPU; wall time "
             f"{data['wall_s'] / 60:.1f} min). Task `{cfg['task']}`, LoRA r = {cfg['r']}, "
             f"alpha = {cfg['r']} on {', '.join(cfg['targets'])}; {cfg['steps']} steps of "
             f"{cfg['batch_size']} examples, AdamW lr {cfg['lr']:g} ({cfg['warmup']} warmup "
             f"steps, then constant), fp32; seeds {', '.join(map(str, cfg['seed_list']))}; "
             f"held-out loss on {cfg['n_test']} test examples. Values are mean (min-max over "
             f"seeds).", "",
             f"| init | seeds | mean train loss, all steps | steps to train loss < "
             f"{TARGET_LOSS:g} | train loss, last 10 steps | held-out loss at step 0 | held-out "
             f"loss at end | vs reference |", "|---|---:|---:|---:|---:|---:|---:|---|"]
    for label, s in summary.items():
        verdict = s["verdict"] if s["verdict"] == "reference" else \
            f"{s['verdict']} than {s['vs']}" if s["verdict"] != "within seed spread" else \
            f"within seed spread of {s['vs']}"
        reach = s["steps_to_target"]
        lines.append(f"| {label} | {s['seeds']} | {_fmt(s['auc'])} | {reach['mean']:.1f} "
                     f"({reach['min']:.0f}-{reach['max']:.0f}) | {_fmt(s['last10'])} | "
                     f"{_fmt(s['eval_start'])} | {_fmt(s['eval_end'])} | {verdict} |")
    if figure:
        lines += ["", f"![mean training loss per init, lr {cfg['lr']:g}, min-max band over "
                  f"seeds]({figure})"]
    return lines


def write_paper_section(path: Path, lines: list[str]) -> None:
    """Replace the generated block of `path` (between the markers), or append it."""
    from lorafleet.bench.doc_block import replace_block
    replace_block(path, PAPER_BEGIN, PAPER_END, "\n".join(lines))


# ---------------------------------------------------------------- the study

def run_study(args) -> dict:
    from lorafleet.bench import progress_for
    from lorafleet.demo.pipeline import default_base_model
    from lorafleet.demo.tasks import make_split
    from lorafleet.errors import ConfigError
    from lorafleet.models import load_tokenizer
    from lorafleet.train.data import tokenize_record

    import torch
    torch.set_num_threads(args.threads)
    labels = [s.strip() for s in args.inits.split(",") if s.strip()]
    unknown = [lb for lb in labels if lb not in INITS]
    if unknown:
        raise ConfigError(f"--inits: unknown {unknown}; expected some of {list(INITS)}")
    base = str(args.base or default_base_model())
    tokenizer = load_tokenizer(base)

    def tokenized(split: str, n: int) -> list:
        examples = [tokenize_record(e.record(), tokenizer)
                    for e in make_split(args.task, split, n, seed=0)]
        return [e for e in examples if len(e.input_ids) <= args.max_len]

    train_set, test_set = tokenized("train", args.n_train), tokenized("test", args.n_test)
    cfg = {"base": base, "task": args.task, "r": args.r,
           "targets": [t.strip() for t in args.targets.split(",") if t.strip()],
           "steps": args.steps, "batch_size": args.batch_size, "lr": args.lr,
           "warmup": args.warmup, "n_train": len(train_set), "n_test": len(test_set),
           "seed_list": list(range(args.seeds)),
           "pad_id": tokenizer.eos_token_id if tokenizer.eos_token_id is not None else 0}
    runs = []
    t0 = time.perf_counter()
    # each run loads the base, injects one init and trains: the bar counts runs
    total = len(cfg["seed_list"]) * len(labels)
    bar = progress_for(args, "bench inits", "run") or (lambda done, total: None)
    bar(0, total)
    for seed in cfg["seed_list"]:
        for label in labels:
            r = run_one(label, seed, train_set, test_set, cfg)
            runs.append(r)
            bar(len(runs), total)
            print(f"{label:28s} seed {seed}: loss {r['train_loss'][0]:.3f} -> "
                  f"{r['train_loss'][-1]:.3f}, held-out {r['eval_loss_start']:.3f} -> "
                  f"{r['eval_loss_end']:.3f}, {r['train_s']:.0f} s", flush=True)
    cfg["base"] = "embedded" if args.base is None else base
    command = "python -m lorafleet.bench.inits " + " ".join(sys.argv[1:])
    return {"command": command.strip(), "config": cfg, "wall_s": time.perf_counter() - t0,
            "summary": summarize(runs), "runs": runs}


def run(args) -> int:
    from lorafleet.bench.doc_block import write_json
    from lorafleet.errors import ConfigError

    if args.quick:
        args.steps, args.seeds, args.n_train, args.n_test = 4, 1, 32, 8
    if args.from_json:
        # several studies (e.g. two learning rates) -> one section, in the order given; each
        # study's figure redrawn from its runs as figures/<json name>_loss.png beside the paper
        if not args.paper:
            raise ConfigError("--from-json: give --paper to write the section to")
        studies = []
        for path in args.from_json:
            data = json.loads(path.read_text())
            data["summary"] = summarize(data["runs"])   # as this code defines the columns
            figure = Path("figures") / f"{path.stem}_loss.png"
            plot_curves(data["runs"], args.paper.parent / figure, _title(data["config"]))
            studies.append((data, str(figure)))
        write_paper_section(args.paper, section_lines(studies))
        return 0
    data = run_study(args)
    for label, s in data["summary"].items():
        print(f"{label:28s} mean loss {_fmt(s['auc'])}  held-out end {_fmt(s['eval_end'])}  "
              f"{s['verdict']}")
    if args.figure:
        plot_curves(data["runs"], args.figure, _title(data["config"]))
        # the figure's path as the paper links it (relative to the paper, else as given)
        data["figure"] = str(args.figure)
        if args.paper:
            try:
                data["figure"] = str(args.figure.resolve().relative_to(
                    args.paper.resolve().parent))
            except ValueError:
                pass
    if args.json:
        write_json(args.json, data, indent=1)
    if args.paper:
        write_paper_section(args.paper, section_lines([(data, data.get("figure"))]))
    return 0


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_arguments(p)
    sys.exit(run(p.parse_args()))
