"""`lorafleet plot RUN`: a training run's curves as PNG: training loss (and evaluation loss) per
step, learning rate, throughput, read from RUN/log.jsonl (written by every `lorafleet train`)."""
from __future__ import annotations

from pathlib import Path


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("plot", help="loss, learning-rate and eval curves of runs as PNG",
                              description="Plot RUN/log.jsonl of one or more training runs "
                                          "(overlaid) into a PNG.")
    p.add_argument("runs", nargs="+", metavar="RUN", help="`lorafleet train` output folders")
    p.add_argument("--out", default=None, help="PNG path (default RUN/curves.png of the first)")
    p.set_defaults(func=run)


def run(args) -> int:
    from lorafleet.train.report import read_log
    logs = {Path(r).name or r: read_log(r) for r in args.runs}
    out = Path(args.out) if args.out else Path(args.runs[0]) / "curves.png"
    plot_runs(logs, out)
    print(f"wrote {out}")
    return 0


def plot_runs(logs: dict[str, list[dict]], out: Path) -> None:
    import matplotlib   # missing: main names the extra that installs it (cli.EXTRAS)

    matplotlib.use("Agg")  # files only: no display needed
    import matplotlib.pyplot as plt

    fig, (loss_ax, lr_ax, speed_ax) = plt.subplots(1, 3, figsize=(15, 4))
    for name, records in logs.items():
        steps = [r for r in records if r.get("type") == "step"]
        evals = [r for r in records if r.get("type") == "eval"]
        x = [r["step"] for r in steps]
        line, = loss_ax.plot(x, [r["loss"] for r in steps], label=f"{name} train")
        if evals:
            loss_ax.plot([r["step"] for r in evals], [r["eval_loss"] for r in evals], "o--",
                         color=line.get_color(), label=f"{name} eval")
        lr_ax.plot(x, [r["lr"] for r in steps], label=name)
        speed_ax.plot(x, [r["tokens_per_s"] for r in steps], label=name)
    for ax, title in ((loss_ax, "loss"), (lr_ax, "learning rate"), (speed_ax, "tokens / s")):
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=100)
    plt.close(fig)
