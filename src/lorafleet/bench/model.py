"""Forward (prefill) and generation speed: our Llama vs transformers' on the same checkpoint,
same dtype, same process, measured alternately so both see the same machine load.

    lorafleet bench model [--hidden 768 --layers 6 --dtype bf16 --prompt 128 --new 64]
                          [--model DIR] [--repeats 5] [--json out.json] [--update-doc DOC]
    lorafleet bench model --from-json docs/results/model.json --update-doc docs/benchmarks.md

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
    parser.add_argument("--from-json", type=Path, default=None,
                        help="measure nothing: render the table of this saved JSON")
    parser.add_argument("--update-doc", type=Path, default=None,
                        help="rewrite the `bench model` block of this doc (docs/benchmarks.md)")


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
    from lorafleet.bench import progress_for

    ours = load_model(model_dir, dtype=dtype, progress=progress_for(args, "loading"))
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
                       "threads": torch.get_num_threads(), "clock": args.clock,
                       "model": str(args.model or "random"),
                       "hidden": ours.config.hidden_size, "layers": ours.config.num_hidden_layers,
                       "heads": ours.config.num_attention_heads,
                       "kv_heads": ours.config.num_key_value_heads, "vocab": vocab},
            "greedy_tokens_equal": f"{matching}/{len(theirs_tokens)}",
            "results": results}


def run(args) -> int:
    from lorafleet.bench.doc_block import command_line, run_ended, run_info, write_block, write_json

    if args.from_json is not None:
        report = json.loads(args.from_json.read_text())
    else:
        info = run_info(command_line("model", args))
        if args.model is None:
            from lorafleet.bench.workloads import make_random_llama

            with tempfile.TemporaryDirectory() as tmp:
                # saved in fp32, as before: measure() casts to --dtype on both sides
                make_random_llama(Path(tmp), args.hidden, args.layers, args.heads, args.kv_heads,
                                  args.vocab, dtype="float32")
                report = measure(Path(tmp), args)
        else:
            report = measure(args.model, args)
        report["run"] = run_ended(info)
    print(markdown(report))
    if args.json and args.from_json is None:
        write_json(args.json, report, indent=2)
    if args.update_doc:
        write_block(args.update_doc, "model", markdown(report))
    return 0


def markdown(report: dict) -> str:
    """The docs/benchmarks.md block of one run's JSON: what ran, the table, the decode step."""
    from lorafleet.bench.doc_block import run_line

    c, results = report["config"], report["results"]
    clock = ("this process's CPU time, which other jobs on the machine do not inflate"
             if c["clock"] == "cpu" else "wall-clock time")
    lines = [run_line(report["run"]), "",
             f"{'Random' if c['model'] == 'random' else c['model']} Llama (hidden {c['hidden']}, "
             f"{c['layers']} layers, {c['heads']} heads / {c['kv_heads']} KV heads, vocab "
             f"{c['vocab']}, {c['parameters'] / 1e6:.1f}M parameters), {c['dtype']}, "
             f"{c['threads']} thread(s); prefill: batch {c['batch']} x {c['prompt']} tokens; "
             f"generate: {c['new']} new tokens, greedy, EOS ignored; best and median of "
             f"{c['repeats']} alternated calls, timed by {clock}. Greedy tokens equal "
             f"transformers': {report['greedy_tokens_equal']}.", "",
             "| | lorafleet tok/s | transformers tok/s | ratio (best) | ratio (median) |",
             "|---|---|---|---|---|"]
    for name, r in results.items():
        lines.append(f"| {name} | {r['ours_tok_s']:.{_digits(r['ours_tok_s'])}f} | "
                     f"{r['transformers_tok_s']:.{_digits(r['transformers_tok_s'])}f} | "
                     f"{r['ratio']:.2f} | {r['median_ratio']:.2f} |")
    if "generate" in results:
        g = results["generate"]
        lines += ["", f"Generation time per new token, the prompt's prefill included (best): "
                  f"{1e3 / g['ours_tok_s']:.1f} ms lorafleet vs "
                  f"{1e3 / g['transformers_tok_s']:.1f} ms transformers."]
    return "\n".join(lines)


def _digits(value: float) -> int:
    """Decimals for a tokens/s figure: three significant digits at least, no false precision."""
    return 0 if value >= 1000 else 1
