"""`lorafleet bench train`: what LoRA saves, measured on one random Llama and one batch.

1. LoRA vs full fine-tuning with our model: peak memory, step time, trainable parameters. The
   LoRA paper (sec. 4.2) reports about 1/3 of full fine-tuning's memory with Adam for GPT-3;
   here too weights dominate (the model is sized so), so full fine-tuning pays weights + grads +
   two Adam moments (4x the weights) against LoRA's 1x plus the small adapter.
   Both also with gradient checkpointing, which removes most activation memory.
2. Our LoRA training step vs PEFT + transformers on the same checkpoint and batch: ours (with
   the fused LoRA layer, lora/fused.py), ours on the plain reference path, and PEFT, interleaved
   round by round in one process (order rotating) so machine load hits all alike; medians,
   spreads and per-round ratios; `--profile` adds each one's top operators (torch.profiler).
3. The adapter file against the full checkpoint (the paper's 350 GB -> 35 MB, at this scale).
4. The machine's matmul roofline (fp32 and bf16 GFLOP/s) in the same run, to read times by.

Each configuration runs in its own subprocess so its memory is its own. Peak memory is the
process's resident-set high-water mark (VmHWM), reset after the model is loaded (Linux
/proc/self/clear_refs) so it measures training, not loading; without that, ru_maxrss.
"model+training" is that peak minus the RSS before the model was built (the interpreter and
libraries, which differ between ours and transformers): weights, grads, optimizer state and
activations.
A step is: forward, next-token loss, backward, AdamW step (the trainer's inner loop).
"""
from __future__ import annotations

import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

MIB = 1024 * 1024
# lora over a float32 base, lora-bf16 over a bf16 base, qlora over the NF4 base streamed from
# the checkpoint (bf16 compute); trained weights are float32 in every case (train/base.py).
CONFIGS = ("lora", "lora+ckpt", "lora-bf16", "lora-bf16+ckpt", "qlora", "qlora+ckpt", "full",
           "full+ckpt")
CONTENDERS = ("ours", "ours_reference", "peft")  # ours_reference: lora/fused.py switched off


def add_arguments(parser) -> None:
    # Default: the 501M-parameter random Llama of docs/results/train_memory.json (issue 14 asks
    # >= 500M); one 64-token row keeps a step to seconds on a 2-core CPU.
    parser.add_argument("--hidden", type=int, default=1536)
    parser.add_argument("--layers", type=int, default=16)
    parser.add_argument("--intermediate", type=int, default=4096)
    parser.add_argument("--heads", type=int, default=12)
    parser.add_argument("--kv-heads", type=int, default=0, help="0: as many as --heads")
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--seq-len", type=int, default=64)
    parser.add_argument("--r", type=int, default=8)
    parser.add_argument("--steps", type=int, default=2, help="timed steps per memory config "
                        "(after 1 warmup); median reported")
    parser.add_argument("--repeats", type=int, default=4, help="rounds of ours / ours without "
                        "the fused layer / PEFT, interleaved in one process (after 1 warmup)")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: default)")
    parser.add_argument("--profile", action="store_true", help="torch.profiler of one step of "
                        "each contender: top operators by self CPU time")
    parser.add_argument("--only-versus", action="store_true", help="skip the memory configs")
    parser.add_argument("--json", dest="json_out", help="write results to this JSON file")
    parser.add_argument("--from-json", nargs="+", help="measure nothing: print the tables of "
                        "these saved runs (in order) and exit")
    parser.add_argument("--update-doc", type=Path, default=None, help="rewrite the `bench "
                        "train` block of this doc (docs/benchmarks.md) with the tables")


# ---- measured in a subprocess -----------------------------------------------------------------

def _rss_kib(field: str) -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


def _reset_peak() -> bool:
    try:
        Path("/proc/self/clear_refs").write_text("5")  # Linux >= 4.0: VmHWM := VmRSS
        return True
    except OSError:
        return False


def _ours(model_dir: str, method: str, r: int):
    """The model as `lorafleet train --method M` builds it (train/base.py): qlora streams the
    checkpoint into NF4, lora-bf16 holds the frozen base in bf16."""
    import torch

    from lorafleet.models import load_model
    from lorafleet.train.base import trainable_in_float32
    from lorafleet.train.methods import OUTPUT_HEADS, MethodConfig, apply_method
    if method == "qlora":
        from lorafleet.quant import load_quantized_model
        model = load_quantized_model(model_dir, dtype=torch.bfloat16, skip=OUTPUT_HEADS)
    else:
        model = load_model(model_dir, dtype=torch.bfloat16 if method == "lora-bf16"
                           else torch.float32)
    model = apply_method(model, MethodConfig(method.removesuffix("-bf16"), r=r, alpha=2 * r))
    trainable_in_float32(model)
    return model.train()


def _peft(model_dir: str, r: int):
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM
    return get_peft_model(AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32),
                          LoraConfig(r=r, lora_alpha=2 * r, target_modules=["q_proj", "v_proj"])
                          ).train()


class _Stepper:
    """One training step of `model` on a fixed batch: forward, loss, backward, AdamW."""

    def __init__(self, model, ids):
        import torch
        self.model, self.ids = model, ids
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(self.params, lr=1e-4)

    def __call__(self) -> tuple[float, float]:
        from lorafleet.train.trainer import logits_of, loss_sum
        start = time.perf_counter()
        loss = loss_sum(logits_of(self.model, self.ids), self.ids) / self.ids[:, 1:].numel()
        loss.backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return time.perf_counter() - start, float(loss)


def _batch(vocab: int, batch_size: int, seq_len: int):
    import torch
    return torch.randint(2, vocab, (batch_size, seq_len), generator=torch.Generator().manual_seed(0))


def worker(kind: str, model_dir: str, batch_size: int, seq_len: int, r: int, steps: int,
           threads: int) -> dict:
    """kind: "lora" | "full", with "+ckpt" for gradient checkpointing. The plain "lora" run also
    saves its adapter (PEFT folder) and reports the file's size."""
    import torch

    from lorafleet.train.trainer import enable_gradient_checkpointing

    if threads:
        torch.set_num_threads(threads)
    torch.manual_seed(0)
    rss_start = _rss_kib("VmRSS")  # interpreter + libraries, before the model exists
    method, _, ckpt = kind.partition("+")
    model = _ours(model_dir, method, r)
    if ckpt:
        enable_gradient_checkpointing(model)
    step = _Stepper(model, _batch(model.config.vocab_size, batch_size, seq_len))
    params = step.params
    rss_loaded = _rss_kib("VmRSS")
    exact_peak = _reset_peak()
    times = []
    for _ in range(steps + 1):
        elapsed, loss = step()
        times.append(elapsed)
    peak = _rss_kib("VmHWM") if exact_peak else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    out = {"config": kind, "trainable_params": sum(p.numel() for p in params),
           "total_params": sum(p.numel() for p in model.parameters()),
           "step_time_s": statistics.median(times[1:]), "step_times_s": times[1:],
           "first_step_s": times[0],
           "rss_loaded_mib": rss_loaded / 1024 if rss_loaded else None,
           "peak_rss_mib": peak / 1024,
           "model_and_training_mib": (peak - rss_start) / 1024 if rss_start else None,
           "loss": loss}
    if kind == "lora":
        import lorafleet
        with tempfile.TemporaryDirectory() as tmp:
            folder = lorafleet.save_adapter(model, Path(tmp) / "adapter")
            out["adapter_bytes"] = sum(f.stat().st_size for f in Path(folder).iterdir()
                                       if f.suffix == ".safetensors")
    return out


def _profile(step, top: int = 12) -> list[dict]:
    """The operators of one step by self CPU time (what binds)."""
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        step()
    rows = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)
    total = sum(e.self_cpu_time_total for e in rows) or 1
    return [{"op": e.key, "calls": e.count, "self_ms": e.self_cpu_time_total / 1e3,
             "share": e.self_cpu_time_total / total} for e in rows[:top]]


def versus_worker(model_dir: str, batch_size: int, seq_len: int, r: int, repeats: int,
                  threads: int, profile: bool = False) -> dict:
    """Our LoRA step (fused layer and, as "ours_reference", the plain path) and PEFT's on the
    same checkpoint and batch, interleaved in one process with the order rotating every round,
    so that load from other processes on a shared machine hits all alike."""
    import torch

    from lorafleet.lora import fused
    if threads:
        torch.set_num_threads(threads)
    torch.manual_seed(0)
    ours, peft = _ours(model_dir, "lora", r), _peft(model_dir, r)
    ids = _batch(ours.config.vocab_size, batch_size, seq_len)
    steppers = {"ours": _Stepper(ours, ids), "ours_reference": _Stepper(ours, ids),
                "peft": _Stepper(peft, ids)}

    def step(name):
        fused.FUSED = name != "ours_reference"
        try:
            return steppers[name]()
        finally:
            fused.FUSED = True

    times = {name: [] for name in CONTENDERS}
    for i in range(repeats + 1):
        order = CONTENDERS[i % 3:] + CONTENDERS[:i % 3]
        for name in order:
            elapsed, _ = step(name)
            if i:  # round 0 is warmup
                times[name].append(elapsed)
    out = {f"{n}_step_s": statistics.median(times[n]) for n in CONTENDERS}
    out.update({f"{n}_times": times[n] for n in CONTENDERS})
    # per-round ratios: both sides of a ratio ran within seconds of each other
    out["ours_over_peft_per_round"] = [a / b for a, b in zip(times["ours"], times["peft"])]
    out["reference_over_peft_per_round"] = [a / b for a, b in zip(times["ours_reference"],
                                                                  times["peft"])]
    if profile:
        out["profile"] = {name: _profile(lambda: step(name)) for name in CONTENDERS}
    return out


def roofline(threads: int, n: int = 2048, repeats: int = 3) -> dict:
    """Best-of matmul GFLOP/s of an n x n x n product in fp32 and bf16 on this machine, now."""
    import torch

    from lorafleet.bench.roofline import matmul_seconds
    if threads:
        torch.set_num_threads(threads)
    out = {"n": n, "threads": torch.get_num_threads()}
    for dtype in (torch.float32, torch.bfloat16):
        best = min(matmul_seconds(n, dtype, repeats))
        out[f"{str(dtype).removeprefix('torch.')}_gflops"] = 2 * n ** 3 / best / 1e9
    return out


# ---- the driver -------------------------------------------------------------------------------

def make_model(path: Path, args) -> int:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=args.hidden, intermediate_size=args.intermediate,
                         num_hidden_layers=args.layers, num_attention_heads=args.heads,
                         num_key_value_heads=args.kv_heads or args.heads, vocab_size=args.vocab,
                         max_position_embeddings=max(256, args.seq_len),
                         tie_word_embeddings=False)
    model = LlamaForCausalLM(config)
    model.save_pretrained(path, safe_serialization=True)
    return sum(p.numel() for p in model.parameters())


def run_worker(call: str) -> dict:
    code = f"import json; from lorafleet.bench.train import *; print(json.dumps({call}))"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          env={**os.environ, "TOKENIZERS_PARALLELISM": "false"})
    if proc.returncode:
        raise RuntimeError(f"bench worker {call} failed:\n{proc.stderr[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _machine() -> str:
    import torch

    from lorafleet.bench.doc_block import cpu_name
    return f"{cpu_name()}, {os.cpu_count()} CPUs, torch {torch.__version__}"


def _spread(values: list[float]) -> dict:
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


def run(args) -> int:
    from lorafleet.bench import progress_for
    from lorafleet.bench.doc_block import write_block

    if args.from_json:
        text = doc_tables([(path, json.loads(Path(path).read_text()))
                           for path in args.from_json])
        print(text)
        if args.update_doc:
            write_block(args.update_doc, "train", text)
        return 0
    load_before = os.getloadavg()
    summary = {"command": "lorafleet bench train " + " ".join(sys.argv[3:]),
               "machine": _machine(), "roofline": roofline(args.threads)}
    with tempfile.TemporaryDirectory() as tmp:
        n_params = make_model(Path(tmp), args)
        model_bytes = sum(f.stat().st_size for f in Path(tmp).glob("*.safetensors"))
        common = f"{tmp!r}, {args.batch_size}, {args.seq_len}, {args.r}"
        # each run loads and trains in its own process: the bar counts runs
        kinds, results = [] if args.only_versus else list(CONFIGS), {}
        bar = progress_for(args, "bench train", "run") or (lambda done, total: None)
        bar(0, len(kinds) + 1)
        for kind in kinds:
            results[kind] = run_worker(f"worker({kind!r}, {common}, {args.steps}, "
                                       f"{args.threads})")
            bar(len(results), len(kinds) + 1)
        versus = run_worker(f"versus_worker({common}, {args.repeats}, {args.threads}, "
                            f"{args.profile})")
        bar(len(kinds) + 1, len(kinds) + 1)
    summary.update({
        "model": {"hidden": args.hidden, "layers": args.layers, "intermediate": args.intermediate,
                  "heads": args.heads, "kv_heads": args.kv_heads or args.heads,
                  "vocab": args.vocab, "params": n_params, "weights_mib": n_params * 4 / MIB,
                  "checkpoint_bytes": model_bytes},
        "batch": [args.batch_size, args.seq_len], "r": args.r, "targets": "q,v",
        "load_average": [load_before[0], os.getloadavg()[0]],
        "results": results, "versus_peft": versus})
    ratios = {"ours_over_peft_step_time": versus["ours_step_s"] / versus["peft_step_s"],
              "reference_over_peft_step_time": (versus["ours_reference_step_s"] /
                                                versus["peft_step_s"]),
              "ours_over_peft_per_round": _spread(versus["ours_over_peft_per_round"]),
              "reference_over_peft_per_round": _spread(versus["reference_over_peft_per_round"])}
    if results:
        lora, full = results["lora"], results["full"]
        ratios.update({
            "lora_over_full_memory": (lora["model_and_training_mib"] /
                                      full["model_and_training_mib"]),
            "lora_over_full_memory_ckpt": (results["lora+ckpt"]["model_and_training_mib"] /
                                           results["full+ckpt"]["model_and_training_mib"]),
            "lora_over_full_peak_rss": lora["peak_rss_mib"] / full["peak_rss_mib"],
            "lora_over_full_step_time": lora["step_time_s"] / full["step_time_s"],
            "adapter_over_checkpoint_size": lora["adapter_bytes"] / model_bytes,
            # issue 14's targets: QLoRA <= 0.45x and LoRA over bf16 <= 0.6x of LoRA over fp32
            "qlora_over_lora_fp32_memory": (results["qlora"]["model_and_training_mib"] /
                                            lora["model_and_training_mib"]),
            "lora_bf16_over_lora_fp32_memory": (results["lora-bf16"]["model_and_training_mib"] /
                                                lora["model_and_training_mib"])})
    summary["ratios"] = ratios
    print(markdown(summary))
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(summary, indent=2))
    if args.update_doc:
        write_block(args.update_doc, "train", doc_tables([(args.json_out or "(not saved)",
                                                            summary)]))
    return 0


def doc_tables(runs: list[tuple[str, dict]]) -> str:
    """The docs/benchmarks.md block: each saved run's tables under the file they come from."""
    return "\n\n".join(f"From {path}:\n\n{markdown(summary)}" for path, summary in runs)


def markdown(s: dict) -> str:
    """The docs/benchmarks.md tables of one run's JSON."""
    m, roof, v, ratios = s["model"], s["roofline"], s["versus_peft"], s["ratios"]
    lines = [f"`{s['command']}` on {s['machine']}; load average "
             f"{s['load_average'][0]:.1f} -> {s['load_average'][1]:.1f}.",
             "",
             f"Random Llama: {m['params'] / 1e6:.1f}M parameters ({m['weights_mib']:.0f} MiB "
             f"fp32; hidden {m['hidden']}, {m['layers']} layers, intermediate "
             f"{m['intermediate']}, {m['heads']}/{m['kv_heads']} heads, vocab {m['vocab']}), "
             f"batch {s['batch'][0]} x {s['batch'][1]} tokens, LoRA r={s['r']} on "
             f"{s['targets']}, AdamW, fp32. Roofline in the same run: {_roofline_text(roof)}.", ""]
    if s["results"]:
        lines += ["| config | trainable params | step (s) | memory (MiB) | peak RSS (MiB) |",
                  "|---|---|---|---|---|"]
        for kind, r in s["results"].items():
            lines.append(f"| {kind} | {r['trainable_params']:,} | {r['step_time_s']:.3g} | "
                         f"{r['model_and_training_mib']:.0f} | {r['peak_rss_mib']:.0f} |")
        lora = s["results"]["lora"]
        lines += ["", f"LoRA / full memory {ratios['lora_over_full_memory']:.2f} "
                  f"({ratios['lora_over_full_memory_ckpt']:.2f} with gradient checkpointing), "
                  f"step time {ratios['lora_over_full_step_time']:.2f}. Adapter file "
                  f"{lora['adapter_bytes'] / 1e6:.2f} MB vs checkpoint "
                  f"{m['checkpoint_bytes'] / 1e9:.2f} GB "
                  f"({1 / ratios['adapter_over_checkpoint_size']:,.0f}x smaller)."
                  + (f" QLoRA / LoRA over fp32 memory "
                     f"{ratios['qlora_over_lora_fp32_memory']:.2f}, LoRA over bf16 / over fp32 "
                     f"{ratios['lora_bf16_over_lora_fp32_memory']:.2f}."
                     if "qlora_over_lora_fp32_memory" in ratios else ""), ""]
    lines += ["| LoRA step, interleaved | median (s) | min (s) | max (s) | / PEFT, per round "
              "(median, min-max) |", "|---|---|---|---|---|"]
    per_round = {"ours": ratios["ours_over_peft_per_round"],
                 "ours_reference": ratios["reference_over_peft_per_round"]}
    for name in CONTENDERS:
        t = v[f"{name}_times"]
        rel = per_round.get(name)
        rel = f"{rel['median']:.2f} ({rel['min']:.2f}-{rel['max']:.2f})" if rel else ""
        lines.append(f"| {name} | {statistics.median(t):.3f} | {min(t):.3f} | {max(t):.3f} | "
                     f"{rel} |")
    return "\n".join(lines)


def _roofline_text(roof: dict) -> str:
    return (f"{roof['float32_gflops']:.0f} GFLOP/s fp32, {roof['bfloat16_gflops']:.0f} bf16 "
            f"({roof['n']}^3 matmul, {roof['threads']} threads)")
