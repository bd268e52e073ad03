"""`lorafleet train`: fine-tune a base model on a data file; writes an adapter folder.

`--config run.yaml` (YAML, TOML or JSON; a run's own train_config.json too) sets the flags'
defaults, in our spelling or TRL's / Axolotl's (train.config.ALIASES); the command line
overrides each one."""
from __future__ import annotations

import argparse
import logging
import sys

from dataclasses import MISSING, fields

from lorafleet.cli.progress import add_progress_argument, progress_bar
from lorafleet.train import MethodConfig, TrainConfig, train
from lorafleet.train.config import ALIASES, TRL_FLAGS, normalize_keys

EXAMPLES = """\
examples:
  lorafleet train --model ./tiny-llama --data train.jsonl --out runs/lora
  lorafleet train --model ./tiny-llama --data chat.jsonl --out runs/qlora --method qlora \\
      --targets all-linear --r 16 --alpha 32 --epochs 3 --val-split 0.05 --eval-every 50
  lorafleet train ... --out runs/lora --resume          # continue after Ctrl-C
  lorafleet train --config run.yaml --learning-rate 1e-4   # file + override (TRL spellings ok)
  lorafleet train --config runs/lora/train_config.json --out runs/again   # repeat a run
  torchrun --nproc_per_node 2 -m lorafleet.cli train ...   # data parallel (gloo/NCCL)

data: JSONL (one object per line), a JSON array, CSV, Parquet or a datasets folder; records
  {"prompt": "...", "completion": "..."}   loss on the completion only (--train-on-prompt: all)
  {"messages": [{"role": "user", "content": "..."}, {"role": "assistant", ...}]}
                                           chat template applied; loss on assistant turns
  {"text": "..."}                          loss on every token
  {"instruction", "input", "output"}       Alpaca (its prompt template)
  {"conversations": [{"from": "human", "value": "..."}, {"from": "gpt", ...}]}   ShareGPT
  other column names: --columns prompt=question,completion=answer

output: OUT/adapter (a PEFT folder for lora/qlora, safetensors + method.json otherwise),
OUT/checkpoints (resumable), OUT/log.jsonl (one line per step / evaluation)
"""


GROUPS = ("required", "method", "optimization", "data", "run")


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "train", help="fine-tune with LoRA, QLoRA, full or a baseline method",
        description="Fine-tune a base model folder on a data file and save the trained "
                    "adapter. Ctrl-C saves a checkpoint; --resume continues it exactly.",
        epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    groups = {name: p.add_argument_group(name) for name in GROUPS}
    # Flags, defaults and help come from the dataclass fields (lorafleet.train.config): one copy.
    for cls in (TrainConfig, MethodConfig):
        for f in fields(cls):
            if "help" in f.metadata:
                add_field_argument(groups[f.metadata["group"]], f)
    p.add_argument("--config", metavar="FILE",
                   help="YAML, TOML or JSON file of these settings (our names or TRL / Axolotl "
                        "ones, e.g. a run's train_config.json); flags override it")
    p.normalize_config = normalize_keys   # cli/config_file.py: TRL names, nested method, lists
    groups["run"].add_argument("--fsdp", dest="parallel", action="store_const", const="fsdp",
                               help="same as --parallel fsdp")
    add_progress_argument(groups["run"])
    p.set_defaults(func=run_train)


def add_field_argument(group, f) -> None:
    """`--field-name` for a dataclass field: bool -> a switch, int/float -> typed, else str;
    required when the field has no default."""
    flags = ["--" + name.replace("_", "-") for name in
             [f.name] + [a for a in TRL_FLAGS if ALIASES[a] == f.name]]
    help_text = f.metadata["help"].replace("%", "%%")
    kind = str(f.type)
    if kind == "bool":
        # --x / --no-x: a config file's `x: true` can be turned off on the command line
        group.add_argument(*flags, action=argparse.BooleanOptionalAction, default=f.default,
                           help=help_text)
        return
    kw = {key: f.metadata[key] for key in ("choices", "metavar") if key in f.metadata}
    if f.default is MISSING and f.default_factory is MISSING:
        kw["required"] = True
    else:
        kw["default"] = f.default
        if f.default is not None:
            help_text += f" (default {f.default})"
    value_type = int if kind.startswith("int") else float if kind.startswith("float") else str
    if f.name == "dtype":
        value_type = str.lower     # as every job's --dtype (models/dtype.add_dtype_argument)
    group.add_argument(*flags, dest=f.name, type=value_type, help=help_text, **kw)


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
        if bar is None:     # on a terminal only, as every bar (cli/progress.py)
            bar = tqdm(total=event["total_steps"], initial=event["step"] - 1, unit="step",
                       disable=not sys.stderr.isatty())
        bar.update(1)
        bar.set_postfix(loss=f"{event['loss']:.4f}", lr=f"{event['lr']:.2e}",
                        tok_s=f"{event['tokens_per_s']:.0f}")

    try:
        loading = progress_bar(args, "loading")
        result = train(cfg, callback=show, progress=lambda done, total: loading(done, total)
                       if distributed.is_main() else None)
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
