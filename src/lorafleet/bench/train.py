"""`lorafleet bench train`: what LoRA saves, measured on one random Llama and one batch.

1. LoRA vs full fine-tuning with our model: peak memory, step time, trainable parameters. The
   LoRA paper (sec. 4.2) reports about 1/3 of full fine-tuning's memory with Adam for GPT-3;
   here too weights dominate (the model is sized so), so full fine-tuning pays weights + grads +
   two Adam moments (4x the weights) against LoRA's 1x plus the small adapter.
2. Our LoRA training step vs PEFT + transformers on the same checkpoint (step time ratio).

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
CONFIGS = ("lora", "full", "peft")


def add_arguments(parser) -> None:
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--intermediate", type=int, default=2816)
    parser.add_argument("--heads", type=int, default=16)
    parser.add_argument("--vocab", type=int, default=8192)
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--r", type=int, default=8)
    parser.add_argument("--steps", type=int, default=3, help="timed steps (after 1 warmup)")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: default)")
    parser.add_argument("--json", dest="json_out", help="write results to this JSON file")


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


def worker(kind: str, model_dir: str, batch_size: int, seq_len: int, r: int, steps: int,
           threads: int) -> dict:
    import torch

    from lorafleet.train.trainer import logits_of, loss_sum

    if threads:
        torch.set_num_threads(threads)
    torch.manual_seed(0)
    rss_start = _rss_kib("VmRSS")  # interpreter + libraries, before the model exists
    if kind == "peft":
        from peft import LoraConfig, get_peft_model
        from transformers import AutoModelForCausalLM
        model = get_peft_model(
            AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32),
            LoraConfig(r=r, lora_alpha=2 * r, target_modules=["q_proj", "v_proj"]))
    else:
        from lorafleet.models import load_model
        from lorafleet.train.methods import MethodConfig, apply_method
        model = apply_method(load_model(model_dir), MethodConfig(kind, r=r, alpha=2 * r))
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4)
    vocab = model.config.vocab_size
    ids = torch.randint(2, vocab, (batch_size, seq_len), generator=torch.Generator().manual_seed(0))
    rss_loaded = _rss_kib("VmRSS")
    exact_peak = _reset_peak()
    times = []
    for _ in range(steps + 1):
        start = time.perf_counter()
        loss = loss_sum(logits_of(model, ids), ids) / ids[:, 1:].numel()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - start)
    peak = _rss_kib("VmHWM") if exact_peak else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {"config": kind, "trainable_params": sum(p.numel() for p in params),
            "total_params": sum(p.numel() for p in model.parameters()),
            "step_time_s": statistics.median(times[1:]), "first_step_s": times[0],
            "rss_loaded_mib": rss_loaded / 1024 if rss_loaded else None,
            "peak_rss_mib": peak / 1024,
            "model_and_training_mib": (peak - rss_start) / 1024 if rss_start else None,
            "loss": float(loss)}


# ---- the driver -------------------------------------------------------------------------------

def make_model(path: Path, args) -> int:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=args.hidden, intermediate_size=args.intermediate,
                         num_hidden_layers=args.layers, num_attention_heads=args.heads,
                         num_key_value_heads=args.heads, vocab_size=args.vocab,
                         max_position_embeddings=max(256, args.seq_len),
                         tie_word_embeddings=False)
    model = LlamaForCausalLM(config)
    model.save_pretrained(path, safe_serialization=True)
    return sum(p.numel() for p in model.parameters())


def run_worker(kind: str, model_dir: Path, args) -> dict:
    call = (f"import json; from lorafleet.bench.train import worker; print(json.dumps(worker("
            f"{kind!r}, {str(model_dir)!r}, {args.batch_size}, {args.seq_len}, {args.r}, "
            f"{args.steps}, {args.threads})))")
    proc = subprocess.run([sys.executable, "-c", call], capture_output=True, text=True,
                          env={**os.environ, "TOKENIZERS_PARALLELISM": "false"})
    if proc.returncode:
        raise RuntimeError(f"bench worker {kind} failed:\n{proc.stderr[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def run(args) -> int:
    with tempfile.TemporaryDirectory() as tmp:
        n_params = make_model(Path(tmp), args)
        results = {kind: run_worker(kind, Path(tmp), args) for kind in CONFIGS}
    lora, full, peft = results["lora"], results["full"], results["peft"]
    summary = {
        "model": {"hidden": args.hidden, "layers": args.layers, "intermediate":
                  args.intermediate, "vocab": args.vocab, "params": n_params,
                  "weights_mib": n_params * 4 / MIB},
        "batch": [args.batch_size, args.seq_len], "r": args.r, "targets": "q,v",
        "results": results,
        "lora_over_full_peak_rss": lora["peak_rss_mib"] / full["peak_rss_mib"],
        "lora_over_full_training_memory": (lora["model_and_training_mib"] /
                                           full["model_and_training_mib"]
                                           if full["model_and_training_mib"] else None),
        "lora_over_full_step_time": lora["step_time_s"] / full["step_time_s"],
        "ours_over_peft_step_time": lora["step_time_s"] / peft["step_time_s"],
    }
    print(f"random Llama: {n_params / 1e6:.1f}M params ({n_params * 4 / MIB:.0f} MiB fp32), "
          f"batch {args.batch_size}x{args.seq_len}, LoRA r={args.r} on q,v")
    print(f"{'config':<14}{'trainable':>14}{'step (s)':>10}{'peak RSS MiB':>14}"
          f"{'model+training MiB':>20}")
    names = {"lora": "ours LoRA", "full": "ours full FT", "peft": "PEFT LoRA"}
    for kind in CONFIGS:
        r = results[kind]
        above = f"{r['model_and_training_mib']:.0f}" if r["model_and_training_mib"] else "n/a"
        print(f"{names[kind]:<14}{r['trainable_params']:>14,}{r['step_time_s']:>10.3f}"
              f"{r['peak_rss_mib']:>14.0f}{above:>20}")
    if summary["lora_over_full_training_memory"]:
        print(f"LoRA / full: model+training memory "
              f"{summary['lora_over_full_training_memory']:.2f}")
    print(f"LoRA / full: peak RSS {summary['lora_over_full_peak_rss']:.2f}, step time "
          f"{summary['lora_over_full_step_time']:.2f}; ours / PEFT step time "
          f"{summary['ours_over_peft_step_time']:.2f}")
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(summary, indent=2))
    return 0
