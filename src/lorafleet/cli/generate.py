"""`lorafleet generate`: complete one prompt with a base model folder, optionally with an
adapter (PEFT folder) and a 4-bit (NF4) base."""
from __future__ import annotations

import argparse
import json
import sys

from lorafleet.cli.progress import add_progress_argument, load_base
from lorafleet.models.dtype import add_dtype_argument

EXAMPLES = """\
examples:
  lorafleet generate --model ./tiny-llama --prompt "the quick brown" --max-tokens 20
  lorafleet generate --model ./tiny-llama --adapter runs/lora/adapter --chat \\
      --prompt "name : the eagle" --temperature 0.8 --top-p 0.95 --seed 1 --json
  lorafleet generate --model ./tiny-llama --quantize nf4 --dtype bf16 --prompt "to be"
"""


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "generate", help="complete a prompt with a model (and an adapter)",
        description="Generate text with a Hugging Face checkpoint folder, greedy or sampled.",
        epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="checkpoint folder (config.json, "
                   "safetensors, tokenizer.json)")
    p.add_argument("--adapter", help="PEFT adapter folder to apply")
    add_dtype_argument(p, help_suffix="; generation takes bf16 wherever the device computes it")
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ...")
    p.add_argument("--prompt", required=True, help="prompt text ('-' reads stdin)")
    p.add_argument("--max-tokens", type=int, default=32, help="new tokens at most")
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0, help="0 = no limit")
    p.add_argument("--seed", type=int)
    p.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    p.add_argument("--ignore-eos", action="store_true")
    p.add_argument("--chat", action="store_true", help="wrap the prompt as a user message with "
                   "the model's chat template")
    p.add_argument("--json", action="store_true", help='print {"text", "token_ids", ...}')
    p.add_argument("--quantize", choices=["nf4"], help="load the base with 4-bit NF4 linears")
    add_progress_argument(p)
    p.set_defaults(func=run)


def load(args):
    """The model (quantized and/or with an adapter) and tokenizer the arguments describe."""
    from lorafleet.models import load_tokenizer
    from lorafleet.models.dtype import resolve_dtype

    model = load_base(args, resolve_dtype(args.dtype, args.model, args.device, prefer_half=True))
    if args.adapter:
        import lorafleet
        lorafleet.load_adapter(model, args.adapter, adapter_name="default")
    return model, load_tokenizer(args.model)


def run(args) -> int:
    from lorafleet.models import SamplingParams, generate

    prompt = sys.stdin.read() if args.prompt == "-" else args.prompt
    sampling = SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature,
                              top_k=args.top_k, top_p=args.top_p, seed=args.seed,
                              stop=args.stop, ignore_eos=args.ignore_eos)
    model, tokenizer = load(args)
    if args.chat:
        prompt_ids = tokenizer.apply_chat_template([{"role": "user", "content": prompt}],
                                                   tokenize=True)
    else:
        prompt_ids = tokenizer.encode(prompt)
    result = generate(model, prompt_ids, sampling=sampling, tokenizer=tokenizer)
    if args.json:
        print(json.dumps({"text": result.text, "token_ids": result.token_ids,
                          "finish_reason": result.finish_reason,
                          "prompt_tokens": len(prompt_ids)}))
    else:
        print(result.text)
    return 0
