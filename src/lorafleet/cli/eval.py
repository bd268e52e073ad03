"""`lorafleet eval`: loss, perplexity and (with --generate) task metrics of several adapters on one
data file, as a table (or JSON lines with --json).

    lorafleet eval --model ./base --data val.jsonl base runs/a/adapter \
        runs/b/checkpoints/step-00000100/adapter
"""
from __future__ import annotations

import json

from lorafleet.cli.progress import add_progress_argument, progress_bar


def add_parser(subparsers) -> None:
    from lorafleet.models.dtype import add_dtype_argument
    from lorafleet.train.sources import RECORD_FORMATS
    p = subparsers.add_parser(
        "eval", help="loss, perplexity and task metrics of adapters on a data file",
        description="Evaluate each ADAPTER (a PEFT folder, a run's adapter/ or a checkpoint's "
                    "adapter/; `base` for no adapter) on the same data: mean next-token loss "
                    "on the label tokens (as training counts it), perplexity, and with "
                    "--generate exact match and chrF of greedy completions.")
    p.add_argument("adapters", nargs="+", metavar="ADAPTER", help="adapter folders, or base")
    p.add_argument("--model", required=True, help="base model folder")
    p.add_argument("--data", required=True, help="JSONL, JSON, CSV, Parquet or datasets folder")
    p.add_argument("--format", default="auto", choices=RECORD_FORMATS, help="record layout")
    p.add_argument("--columns", default=None, metavar="MAP",
                   help="column mapping OURS=THEIRS,... (prompt=question,completion=answer)")
    p.add_argument("--max-len", type=int, default=512, help="tokens per example (default 512)")
    p.add_argument("--batch-size", type=int, default=8, help="examples per forward (default 8)")
    p.add_argument("--generate", action="store_true",
                   help="also complete each prompt greedily: exact match and chrF")
    p.add_argument("--max-new-tokens", type=int, default=64, help="for --generate (default 64)")
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1 (default cpu)")
    add_dtype_argument(p)
    p.add_argument("--json", action="store_true", help="one JSON object per adapter")
    add_progress_argument(p)
    p.set_defaults(func=run)


def run(args) -> int:
    from lorafleet.lora.peft_format import adapter_folder
    from lorafleet.models.dtype import resolve_dtype
    from lorafleet.train.data import DataConfig
    from lorafleet.train.evaluate import evaluate_adapters

    data = DataConfig(args.data, max_len=args.max_len, format=args.format, columns=args.columns)
    dtype = resolve_dtype(args.dtype, args.model, args.device)
    # a training run or checkpoint folder stands for its adapter/ (as TRL's checkpoint-N/ is one)
    adapters = [a if a == "base" else str(adapter_folder(a)) for a in args.adapters]
    bar, done = progress_bar(args, "evaluating", "adapter"), [0]
    bar(0, len(adapters))

    def evaluated(result) -> None:
        done[0] += 1
        bar(done[0], len(adapters))

    results = evaluate_adapters(args.model, data, adapters, batch_size=args.batch_size,
                                dtype=dtype, device=args.device, generate=args.generate,
                                max_new_tokens=args.max_new_tokens, progress=evaluated)
    if args.json:
        for r in results:
            print(json.dumps(r.to_json()))
        return 0
    width = max(len(r.adapter) for r in results)
    header = f"{'adapter':<{width}}  {'loss':>8}  {'ppl':>9}  {'tokens':>7}"
    if args.generate:
        header += f"  {'exact':>6}  {'chrF':>6}"
    print(header)
    for r in results:
        line = f"{r.adapter:<{width}}  {r.loss:8.4f}  {r.perplexity:9.2f}  {r.tokens:7d}"
        if args.generate:
            line += f"  {r.exact_match:6.3f}  {r.chrf:6.2f}"
        print(line)
    return 0
