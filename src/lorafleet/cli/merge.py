"""`lorafleet merge --model BASE_DIR --adapter ADAPTER_DIR [--adapter DIR2 ...] [--weights W ...]
--out OUT_DIR [--dtype]`.

Writes a full Hugging Face checkpoint folder with W = W0 + sum_i w_i * scaling_i * B_i A_i (one
adapter: weight 1; a DoRA adapter: W0 rescaled per row), by tensor-name arithmetic on the
safetensors files (no model code), config and tokenizer files copied.
"""
from __future__ import annotations

from lorafleet.cli.progress import add_progress_argument, progress_bar
from lorafleet.models.dtype import add_dtype_argument


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser("merge", help="merge PEFT adapter(s) into a base checkpoint folder")
    parser.add_argument("--model", required=True, metavar="BASE_DIR", help="Hugging Face checkpoint folder")
    parser.add_argument("--adapter", required=True, metavar="ADAPTER_DIR", action="append",
                        help="PEFT adapter folder (repeat for several)")
    parser.add_argument("--weights", type=float, nargs="+", default=None, metavar="W",
                        help="one weight per --adapter (default: 1 each); may be negative")
    parser.add_argument("--out", required=True, metavar="OUT_DIR", help="new checkpoint folder")
    add_dtype_argument(parser, help_suffix="; here the written weights' dtype, auto keeping "
                       "the base checkpoint's")
    add_progress_argument(parser)
    parser.set_defaults(func=run)


def run(args) -> int:
    from lorafleet.lora.merge import merge_checkpoint

    adapters = args.adapter[0] if len(args.adapter) == 1 else args.adapter
    report = merge_checkpoint(args.model, adapters, args.out, dtype=args.dtype,
                              weights=args.weights, progress=progress_bar(args, "merging"))
    print(f"merged {len(report.merged)} weight tensors"
          + (f", replaced {len(report.replaced)}" if report.replaced else "")
          + f" -> {report.out_dir} ({len(report.files)} safetensors file(s))")
    return 0
