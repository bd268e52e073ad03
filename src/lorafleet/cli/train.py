"""`lorafleet train`: fine-tune a base model on a JSONL file; writes an adapter folder."""
from __future__ import annotations

import argparse
import logging

from lorafleet.train import TrainConfig, train
from lorafleet.train.methods import METHODS

EXAMPLES = """\
examples:
  lorafleet train --model ./tiny-llama --data train.jsonl --out runs/lora
  lorafleet train --model ./tiny-llama --data chat.jsonl --out runs/qlora --method qlora \\
      --targets all-linear --r 16 --alpha 32 --epochs 3 --val-split 0.05 --eval-every 50
  lorafleet train ... --out runs/lora --resume          # continue after Ctrl-C
  torchrun --nproc_per_node 2 -m lorafleet.cli train ...   # data parallel (gloo/NCCL)

data: one JSON object per line, any of
  {"prompt": "...", "completion": "..."}   loss on the completion only
  {"messages": [{"role": "user", "content": "..."}, {"role": "assistant", ...}]}
                                           chat template applied; loss on assistant turns
  {"text": "..."}                          loss on every token

output: OUT/adapter (a PEFT folder for lora/qlora, safetensors + method.json otherwise),
OUT/checkpoints (resumable), OUT/log.jsonl (one line per step / evaluation)
"""


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "train", help="fine-tune with LoRA, QLoRA, full or a baseline method",
        description="Fine-tune a base model folder on a JSONL file and save the trained "
                    "adapter. Ctrl-C saves a checkpoint; --resume continues it exactly.",
        epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    d = TrainConfig.__dataclass_fields__
    req = p.add_argument_group("required")
    req.add_argument("--model", required=True, help="base model folder (config.json, "
                     "safetensors, tokenizer.json)")
    req.add_argument("--data", required=True, help="training data, JSONL")
    req.add_argument("--out", required=True, help="output folder for this run")
    m = p.add_argument_group("method")
    m.add_argument("--method", choices=sorted(METHODS), default="lora",
                   help="lora (default), qlora (4-bit NF4 base + lora), full, adapter "
                        "(bottleneck layers), prefix, prompt, bitfit (biases only)")
    m.add_argument("--r", type=int, default=d["r"].default, help="LoRA rank (default 8)")
    m.add_argument("--alpha", type=float, default=d["alpha"].default,
                   help="LoRA alpha; the update is scaled by alpha/r (default 16)")
    m.add_argument("--dropout", type=float, default=0.0, help="LoRA dropout (default 0)")
    m.add_argument("--targets", default="q,v",
                   help="modules to adapt: comma-separated short names (q,k,v,o,gate,up,down) "
                        "or module names, or all-linear (default q,v as in the LoRA paper)")
    m.add_argument("--bottleneck", type=int, default=16, help="adapter: bottleneck width")
    m.add_argument("--virtual-tokens", type=int, default=8,
                   help="prefix/prompt: number of learned positions")
    o = p.add_argument_group("optimization")
    length = o.add_mutually_exclusive_group()
    length.add_argument("--steps", type=int, help="optimizer steps")
    length.add_argument("--epochs", type=float, help="passes over the data (default 1)")
    o.add_argument("--lr", type=float, default=d["lr"].default,
                   help="peak learning rate (default 2e-4; ~2e-5 suits --method full)")
    o.add_argument("--weight-decay", type=float, default=0.0)
    o.add_argument("--batch-size", type=int, default=4, help="examples per micro-batch and "
                   "process (default 4)")
    o.add_argument("--grad-accum", type=int, default=1,
                   help="micro-batches per optimizer step (default 1)")
    o.add_argument("--warmup", type=int, default=0, help="linear warmup steps (default 0)")
    o.add_argument("--schedule", choices=["cosine", "linear", "constant"], default="cosine",
                   help="decay after warmup, to 0.1 x lr (default cosine)")
    o.add_argument("--max-grad-norm", type=float, default=1.0, help="clip (0: off; default 1)")
    o.add_argument("--bf16", action="store_true", help="bf16 autocast (weights stay fp32)")
    o.add_argument("--grad-checkpointing", action="store_true",
                   help="recompute activations in backward: less memory, ~30%% slower")
    o.add_argument("--seed", type=int, default=0)
    data = p.add_argument_group("data")
    data.add_argument("--max-len", type=int, default=512,
                      help="tokens per example; longer ones are truncated (count reported)")
    data.add_argument("--pack", action="store_true",
                      help="concatenate examples into --max-len rows (no padding)")
    val = data.add_mutually_exclusive_group()
    val.add_argument("--val-file", help="validation JSONL")
    val.add_argument("--val-split", type=float, default=0.0,
                     help="fraction of --data held out for validation")
    data.add_argument("--skip-bad-lines", action="store_true",
                      help="skip malformed JSONL lines (counted) instead of stopping")
    run = p.add_argument_group("run")
    run.add_argument("--eval-every", type=int, default=0,
                     help="evaluate every N steps (default: at the end only)")
    run.add_argument("--save-every", type=int, default=0,
                     help="checkpoint every N steps (default: only on Ctrl-C / SIGTERM)")
    state = run.add_mutually_exclusive_group()
    state.add_argument("--resume", action="store_true", help="continue the run in --out")
    state.add_argument("--overwrite", action="store_true", help="replace the run in --out")
    run.add_argument("--device", help="cpu, cuda, cuda:1 (default: cuda if available)")
    run.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=run_train)


def config_from_args(args) -> TrainConfig:
    fields = TrainConfig.__dataclass_fields__
    return TrainConfig(**{name: getattr(args, name) for name in fields if hasattr(args, name)})


def run_train(args) -> int:
    from tqdm import tqdm

    from lorafleet.train import distributed

    cfg = config_from_args(args)
    bar = None

    def show(event: dict) -> None:
        nonlocal bar
        if args.no_progress or not distributed.is_main():
            return
        if event["type"] == "eval":
            tqdm.write(f"step {event['step']}: eval loss {event['eval_loss']:.4f}, "
                       f"perplexity {event['perplexity']:.2f}")
            return
        if bar is None:
            bar = tqdm(total=event["total_steps"], initial=event["step"] - 1, unit="step")
        bar.update(1)
        bar.set_postfix(loss=f"{event['loss']:.4f}", lr=f"{event['lr']:.2e}",
                        tok_s=f"{event['tokens_per_s']:.0f}")

    try:
        result = train(cfg, callback=show)
        main_process = distributed.is_main()
    finally:
        if bar is not None:
            bar.close()
        distributed.cleanup()
    if not main_process:
        return 0
    if result.interrupted:
        print(f"interrupted at step {result.steps}; checkpoint saved in {result.out}/checkpoints."
              f" Continue with the same command plus --resume.")
        return 130
    summary = f"done: {result.steps} steps, loss {result.loss:.4f}"
    if result.eval_loss is not None:
        summary += f", eval loss {result.eval_loss:.4f}"
    print(f"{summary}. Adapter: {result.artifact}")
    logging.getLogger(__name__).debug("log: %s", result.out / "log.jsonl")
    return 0
