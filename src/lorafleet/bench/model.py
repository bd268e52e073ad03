"""Forward (prefill) and generation speed: our Llama vs transformers' on the same checkpoint,
same dtype, same process, measured alternately so both see the same machine load.

    lorafleet bench model [--hidden 768 --layers 6 --dtype bf16 --prompt 128 --new 64]
                          [--model DIR] [--repeats 5] [--json out.json]

Prefill: tokens/s of one forward over batch x prompt tokens (full logits on both sides).
Generation: new tokens/s of greedy decoding from a prompt (our `generate` with its contiguous KV
cache vs `model.generate(do_sample=False)`), EOS ignored so both produce exactly --new tokens.
Figures are best-of --repeats (and the median); ratio = ours / transformers speed (> 1: we are
faster).
"""
from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", type=Path, default=None,
                        help="checkpoint folder (default: a random Llama built from the flags)")
    parser.add_argument("--hidden", type=int, default=768)
    parser.add_argument("--layers", type=int, default=6)
    parser.add_argument("--heads", type=int, default=12)
    parser.add_argument("--kv-heads", type=int, default=4)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--dtype", default="bf16", choices=["fp32", "bf16", "fp16"])
    parser.add_argument("--batch", type=int, default=1, help="prefill batch size")
    parser.add_argument("--prompt", type=int, default=128, help="prompt tokens")
    parser.add_argument("--new", type=int, default=64, help="generated tokens")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=None, help="torch threads")
    parser.add_argument("--clock", choices=["wall", "cpu"], default="wall",
                        help="cpu: this process's CPU time, which other processes on a shared "
                             "machine do not inflate (use with --threads 1)")
    parser.add_argument("--json", type=Path, default=None, help="write the results here")


def make_random_llama(path: Path, hidden: int, layers: int, heads: int, kv_heads: int,
                      vocab: int) -> None:
    """A random-weight Llama (GQA) saved as a Hugging Face folder."""
    import torch
    import transformers

    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        hidden_size=hidden, intermediate_size=int(hidden * 8 / 3) // 64 * 64,
        num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv_heads,
        vocab_size=vocab, max_position_embeddings=4096, tie_word_embeddings=False)
    transformers.LlamaForCausalLM(config).save_pretrained(path)


def seconds(fn, clock=time.perf_counter) -> float:
    start = clock()
    fn()
    return clock() - start


def measure(model_dir: Path, args) -> dict:
    import torch
    import transformers

    from lorafleet.models import SamplingParams, generate, load_model, parse_dtype

    if args.threads:
        torch.set_num_threads(args.threads)
    dtype = parse_dtype(args.dtype)
    ours = load_model(model_dir, dtype=dtype)
    theirs = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype).eval()
    vocab = ours.config.vocab_size
    g = torch.Generator().manual_seed(0)
    batch_ids = torch.randint(0, vocab, (args.batch, args.prompt), generator=g)
    prompt = batch_ids[:1]
    sampling = SamplingParams(max_tokens=args.new, ignore_eos=True)

    cases = {
        "prefill": (args.batch * args.prompt,
                    lambda: ours(batch_ids),
                    lambda: theirs(batch_ids).logits),
        "generate": (args.new,
                     lambda: generate(ours, prompt[0], sampling=sampling),
                     lambda: theirs.generate(prompt, max_new_tokens=args.new,
                                             min_new_tokens=args.new, do_sample=False)),
    }
    clock = time.process_time if args.clock == "cpu" else time.perf_counter
    results = {}
    with torch.inference_mode():
        ours_tokens = generate(ours, prompt[0], sampling=sampling).token_ids
        theirs_tokens = theirs.generate(prompt, max_new_tokens=args.new, min_new_tokens=args.new,
                                        do_sample=False)[0, args.prompt:].tolist()
        for name, (tokens, ours_fn, theirs_fn) in cases.items():
            ours_fn(), theirs_fn()  # warm up (allocator, one-time kernels)
            ours_t, theirs_t = [], []
            for _ in range(args.repeats):  # alternate, so load changes hit both alike
                ours_t.append(seconds(ours_fn, clock))
                theirs_t.append(seconds(theirs_fn, clock))
            # best-of-N is the figure least disturbed by other processes on a shared machine
            results[name] = {
                "tokens": tokens,
                "ours_tok_s": tokens / min(ours_t), "transformers_tok_s": tokens / min(theirs_t),
                "ratio": min(theirs_t) / min(ours_t),
                "ours_median_tok_s": tokens / statistics.median(ours_t),
                "transformers_median_tok_s": tokens / statistics.median(theirs_t),
                "median_ratio": statistics.median(theirs_t) / statistics.median(ours_t)}
    matching = sum(a == b for a, b in zip(ours_tokens, theirs_tokens))
    params = sum(p.numel() for p in ours.parameters())
    return {"config": {"dtype": args.dtype, "batch": args.batch, "prompt": args.prompt,
                       "new": args.new, "repeats": args.repeats, "parameters": params,
                       "threads": torch.get_num_threads(), "clock": args.clock, "model": str(args.model or "random"),
                       "hidden": ours.config.hidden_size, "layers": ours.config.num_hidden_layers},
            "greedy_tokens_equal": f"{matching}/{len(theirs_tokens)}",
            "results": results}


def run(args) -> int:
    if args.model is None:
        with tempfile.TemporaryDirectory() as tmp:
            make_random_llama(Path(tmp), args.hidden, args.layers, args.heads, args.kv_heads,
                              args.vocab)
            report = measure(Path(tmp), args)
    else:
        report = measure(args.model, args)
    c = report["config"]
    print(f"model: {c['model']} Llama hidden={c['hidden']} layers={c['layers']} "
          f"({c['parameters'] / 1e6:.1f}M params), {c['dtype']}, {c['threads']} threads, "
          f"{c['clock']} clock, best of {c['repeats']} (tok/s)")
    print(f"{'':10} {'ours tok/s':>12} {'transformers tok/s':>20} {'ratio':>7} "
          f"{'median ratio':>13}")
    for name, r in report["results"].items():
        print(f"{name:10} {r['ours_tok_s']:12.1f} {r['transformers_tok_s']:20.1f} "
              f"{r['ratio']:7.2f} {r['median_ratio']:13.2f}")
    print(f"greedy tokens equal: {report['greedy_tokens_equal']} (bf16 rounding may differ)")
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))
    return 0
