"""`lorafleet bench train`: what LoRA saves, measured on one random Llama and one batch.

1. LoRA vs full fine-tuning with our model: peak memory, step time, trainable parameters. The
   LoRA paper (sec. 4.2) reports about 1/3 of full fine-tuning's memory with Adam for GPT-3;
   here too weights dominate (the model is sized so), so full fine-tuning pays weights + grads +
   two Adam moments (4x the weights) against LoRA's 1x plus the small adapter.
   Both also with gradient checkpointing, which removes most activation memory.
2. Our LoRA training step vs PEFT + transformers on the same checkpoint (step time ratio),
   the two alternating step by step in one process so machine load hits both alike.

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
CONFIGS = ("lora", "lora+ckpt", "full", "full+ckpt")


def add_arguments(parser) -> None:
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--intermediate", type=int, default=2816)
    parser.add_argument("--heads", type=int, default=16)
    parser.add_argument("--vocab", type=int, default=8192)
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--r", type=int, default=8)
    parser.add_argument("--steps", type=int, default=3, help="timed steps (after 1 warmup); "
                        "median reported")
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


def _ours(model_dir: str, method: str, r: int):
    from lorafleet.models import load_model
    from lorafleet.train.methods import MethodConfig, apply_method
    return apply_method(load_model(model_dir), MethodConfig(method, r=r, alpha=2 * r)).train()


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
    """kind: "lora" | "full", with "+ckpt" for gradient checkpointing."""
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
    return {"config": kind, "trainable_params": sum(p.numel() for p in params),
            "total_params": sum(p.numel() for p in model.parameters()),
            "step_time_s": statistics.median(times[1:]), "first_step_s": times[0],
            "rss_loaded_mib": rss_loaded / 1024 if rss_loaded else None,
            "peak_rss_mib": peak / 1024,
            "model_and_training_mib": (peak - rss_start) / 1024 if rss_start else None,
            "loss": loss}


def versus_worker(model_dir: str, batch_size: int, seq_len: int, r: int, steps: int,
                  threads: int) -> dict:
    """Our LoRA step and PEFT's on the same checkpoint, alternating in one process so that
    load from other processes on a shared machine hits both alike; medians of `steps`."""
    import torch
    if threads:
        torch.set_num_threads(threads)
    torch.manual_seed(0)
    ours, peft = _ours(model_dir, "lora", r), _peft(model_dir, r)
    ids = _batch(ours.config.vocab_size, batch_size, seq_len)
    steppers = {"ours": _Stepper(ours, ids), "peft": _Stepper(peft, ids)}
    times = {"ours": [], "peft": []}
    for i in range(steps + 1):
        for name, step in steppers.items():
            elapsed, _ = step()
            if i:  # the first step of each is warmup
                times[name].append(elapsed)
    return {"ours_step_s": statistics.median(times["ours"]),
            "peft_step_s": statistics.median(times["peft"]),
            "ours_times": times["ours"], "peft_times": times["peft"]}


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


def run_worker(call: str) -> dict:
    code = f"import json; from lorafleet.bench.train import *; print(json.dumps({call}))"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          env={**os.environ, "TOKENIZERS_PARALLELISM": "false"})
    if proc.returncode:
        raise RuntimeError(f"bench worker {call} failed:\n{proc.stderr[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def run(args) -> int:
    with tempfile.TemporaryDirectory() as tmp:
        n_params = make_model(Path(tmp), args)
        common = f"{tmp!r}, {args.batch_size}, {args.seq_len}, {args.r}, {args.steps}, " \
                 f"{args.threads}"
        results = {kind: run_worker(f"worker({kind!r}, {common})") for kind in CONFIGS}
        versus = run_worker(f"versus_worker({common})")
    lora, full = results["lora"], results["full"]
    ratio = {
        "lora_over_full_memory": lora["model_and_training_mib"] / full["model_and_training_mib"],
        "lora_over_full_memory_ckpt": (results["lora+ckpt"]["model_and_training_mib"] /
                                       results["full+ckpt"]["model_and_training_mib"]),
        "lora_over_full_peak_rss": lora["peak_rss_mib"] / full["peak_rss_mib"],
        "lora_over_full_step_time": lora["step_time_s"] / full["step_time_s"],
        "ours_over_peft_step_time": versus["ours_step_s"] / versus["peft_step_s"],
    }
    summary = {
        "model": {"hidden": args.hidden, "layers": args.layers, "intermediate":
                  args.intermediate, "vocab": args.vocab, "params": n_params,
                  "weights_mib": n_params * 4 / MIB},
        "batch": [args.batch_size, args.seq_len], "r": args.r, "targets": "q,v",
        "results": results, "versus_peft": versus, "ratios": ratio}
    print(f"random Llama: {n_params / 1e6:.1f}M params ({n_params * 4 / MIB:.0f} MiB fp32), "
          f"batch {args.batch_size}x{args.seq_len}, LoRA r={args.r} on q,v")
    print(f"{'config':<16}{'trainable':>14}{'step (s)':>10}{'peak RSS MiB':>14}"
          f"{'model+training MiB':>20}")
    for kind in CONFIGS:
        r = results[kind]
        above = f"{r['model_and_training_mib']:.0f}" if r["model_and_training_mib"] else "n/a"
        print(f"{kind:<16}{r['trainable_params']:>14,}{r['step_time_s']:>10.3f}"
              f"{r['peak_rss_mib']:>14.0f}{above:>20}")
    print(f"LoRA / full memory (model+training): {ratio['lora_over_full_memory']:.2f}, with "
          f"gradient checkpointing {ratio['lora_over_full_memory_ckpt']:.2f}; step time "
          f"{ratio['lora_over_full_step_time']:.2f}")
    print(f"LoRA step, alternating in one process: ours {versus['ours_step_s']:.3f} s, PEFT + "
          f"transformers {versus['peft_step_s']:.3f} s, ratio "
          f"{ratio['ours_over_peft_step_time']:.2f}")
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(summary, indent=2))
    return 0
