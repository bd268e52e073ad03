"""`lorafleet quantize`: load a checkpoint with its linears in NF4 and report what it stores and how
far its logits move. The same loader backs `--quantize nf4` on generate, train and serve.

    lorafleet quantize --model ./llama [--block-size 64] [--no-double-quant] [--check 32]
"""
from __future__ import annotations

from lorafleet.cli.progress import add_progress_argument, progress_bar
from lorafleet.models.dtype import add_dtype_argument


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "quantize", help="NF4-quantize a model's linears; report bytes/param and logit error",
        description="Load --model with every linear (except the skipped ones) in 4-bit NF4 "
                    "(QLoRA), print the memory it stores and, with --check, the relative logit "
                    "error against the full-precision model on a random prompt.")
    p.add_argument("--model", required=True, help="Hugging Face checkpoint folder")
    add_dtype_argument(p, default="bfloat16",
                       help_suffix="; here the dtype of the parts kept unquantized")
    p.add_argument("--block-size", type=int, default=64)
    p.add_argument("--no-double-quant", action="store_true",
                   help="keep fp32 block scales (4.5 bits/param instead of ~4.127)")
    p.add_argument("--skip", nargs="*", default=["lm_head"],
                   help="module names kept in full precision (default: lm_head)")
    p.add_argument("--check", type=int, default=0, metavar="TOKENS",
                   help="compare logits with the full model on a random prompt of this length")
    add_progress_argument(p)
    p.set_defaults(func=run)


def run(args) -> int:
    import torch

    from lorafleet.models import load_model
    from lorafleet.quant import load_quantized_model, memory_report

    model = load_quantized_model(args.model, dtype=args.dtype, skip=tuple(args.skip),
                                 block_size=args.block_size,
                                 double_quant=not args.no_double_quant,
                                 progress=progress_bar(args, "quantizing"))
    report = memory_report(model)
    full_bytes = report.quantized_params * torch.finfo(torch.bfloat16).bits // 8
    print(f"NF4 layers: {report.quantized_params:,} params in {report.quantized_bytes:,} bytes "
          f"= {report.bits_per_quantized_param:.3f} bits/param "
          f"({report.bytes_per_quantized_param:.4f} bytes; bf16: 2 bytes)")
    print(f"other tensors: {report.other_params:,} params, {report.other_bytes:,} bytes")
    print(f"total stored: {report.total_bytes / 2**20:.1f} MiB (bf16 linears would add "
          f"{(full_bytes - report.quantized_bytes) / 2**20:.1f} MiB)")
    if args.check:
        generator = torch.Generator().manual_seed(0)
        ids = torch.randint(0, model.config.vocab_size, (1, args.check), generator=generator)
        with torch.no_grad():
            reference = load_model(args.model, dtype=torch.float32,
                                   progress=progress_bar(args, "loading fp32"))(ids)
            ours = model.float()(ids)
        error = ((ours - reference).norm() / reference.norm()).item()
        agree = (ours.argmax(-1) == reference.argmax(-1)).float().mean().item()
        print(f"logits vs fp32 on {args.check} random tokens: relative error {error:.4f}, "
              f"top-1 agreement {agree:.1%}")
    return 0
