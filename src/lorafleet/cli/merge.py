"""`lorafleet merge --model BASE_DIR --adapter ADAPTER_DIR --out OUT_DIR [--dtype]`.

Writes a full Hugging Face checkpoint folder with W = W0 + scaling * B A, by tensor-name
arithmetic on the safetensors files (no model code), config and tokenizer files copied.
"""
from __future__ import annotations


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser("merge", help="merge a PEFT adapter into a base checkpoint folder")
    parser.add_argument("--model", required=True, metavar="BASE_DIR", help="Hugging Face checkpoint folder")
    parser.add_argument("--adapter", required=True, metavar="ADAPTER_DIR", help="PEFT adapter folder")
    parser.add_argument("--out", required=True, metavar="OUT_DIR", help="new checkpoint folder")
    parser.add_argument("--dtype", choices=["float32", "float16", "bfloat16"], default=None,
                        help="dtype of the written weights (default: the base checkpoint's)")
    parser.set_defaults(func=run)


def run(args) -> int:
    from lorafleet.lora.merge import merge_checkpoint

    report = merge_checkpoint(args.model, args.adapter, args.out, dtype=args.dtype)
    print(f"merged {len(report.merged)} weight tensors"
          + (f", replaced {len(report.replaced)}" if report.replaced else "")
          + f" -> {report.out_dir} ({len(report.files)} safetensors file(s))")
    return 0
