"""`lorafleet train`: fine-tune a base model on a JSONL file; writes an adapter folder."""
from __future__ import annotations

import argparse
import logging

from dataclasses import MISSING, fields

from lorafleet.train import MethodConfig, TrainConfig, train

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


GROUPS = ("required", "method", "optimization", "data", "run")


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "train", help="fine-tune with LoRA, QLoRA, full or a baseline method",
        description="Fine-tune a base model folder on a JSONL file and save the trained "
                    "adapter. Ctrl-C saves a checkpoint; --resume continues it exactly.",
        epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    groups = {name: p.add_argument_group(name) for name in GROUPS}
    # Flags, defaults and help come from the dataclass fields (lorafleet.train.config): one copy.
    for cls in (TrainConfig, MethodConfig):
        for f in fields(cls):
            if "help" in f.metadata:
                add_field_argument(groups[f.metadata["group"]], f)
    groups["run"].add_argument("--fsdp", dest="parallel", action="store_const", const="fsdp",
                               help="same as --parallel fsdp")
    groups["run"].add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=run_train)


def add_field_argument(group, f) -> None:
    """`--field-name` for a dataclass field: bool -> a switch, int/float -> typed, else str;
    required when the field has no default."""
    flag = "--" + f.name.replace("_", "-")
    help_text = f.metadata["help"].replace("%", "%%")
    kind = str(f.type)
    if kind == "bool":
        group.add_argument(flag, action="store_true", help=help_text)
        return
    kw = {key: f.metadata[key] for key in ("choices", "metavar") if key in f.metadata}
    if f.default is MISSING and f.default_factory is MISSING:
        kw["required"] = True
    else:
        kw["default"] = f.default
        if f.default is not None:
            help_text += f" (default {f.default})"
    value_type = int if kind.startswith("int") else float if kind.startswith("float") else str
    group.add_argument(flag, type=value_type, help=help_text, **kw)


def config_from_args(args) -> TrainConfig:
    names = {f.name for cls in (TrainConfig, MethodConfig) for f in fields(cls)}
    return TrainConfig.from_flat(**{name: getattr(args, name) for name in names
                                    if hasattr(args, name)})


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
