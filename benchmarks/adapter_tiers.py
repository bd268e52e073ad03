"""Does the host tier earn its copy? Time, for one realistic adapter, what a pool load costs
from each tier:

  disk   the loader thread's work: read the safetensors file (page cache warm, as on a server
         that has read it before), check it (finite floats), convert it to page form;
  host   a host-cache hit: nothing of the above (the page copy is kept);
  pool   the write into the pool on the engine thread, the same after either.

    .venv/bin/python benchmarks/adapter_tiers.py [--hidden 2048 --layers 22 --rank 16]

Default shapes: TinyLlama-1.1B (hidden 2048, 22 layers, intermediate 5632, 4 KV heads of 64),
a rank-16 adapter on all seven projections, float32 in the file (PEFT's usual), bf16 pages.
Prints a table and one JSON line.
"""
from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch

from lorafleet.lora.config import LoraConfig
from lorafleet.lora.peft_format import load_peft, write_adapter
from lorafleet.serve.adapter_registry import BaseLayout, build_spec, file_pages

PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def targets(hidden: int, layers: int, intermediate: int, kv_dim: int) -> dict:
    shapes = {"q_proj": (hidden, hidden), "k_proj": (hidden, kv_dim), "v_proj": (hidden, kv_dim),
              "o_proj": (hidden, hidden), "gate_proj": (hidden, intermediate),
              "up_proj": (hidden, intermediate), "down_proj": (intermediate, hidden)}
    group = {p: "self_attn" if p in PROJECTIONS[:4] else "mlp" for p in PROJECTIONS}
    return {f"model.layers.{i}.{group[p]}.{p}": shapes[p] for i in range(layers)
            for p in PROJECTIONS}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hidden", type=int, default=2048)
    parser.add_argument("--layers", type=int, default=22)
    parser.add_argument("--intermediate", type=int, default=5632)
    parser.add_argument("--kv-dim", type=int, default=256)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    layout_targets = targets(args.hidden, args.layers, args.intermediate, args.kv_dim)
    config = LoraConfig(r=args.rank, lora_alpha=2 * args.rank, target_modules=list(PROJECTIONS))
    gen = torch.Generator().manual_seed(0)
    tensors = {}
    for name, (fan_in, fan_out) in layout_targets.items():
        key = f"base_model.model.{name}"
        tensors[f"{key}.lora_A.weight"] = torch.randn(args.rank, fan_in, generator=gen) * 0.01
        tensors[f"{key}.lora_B.weight"] = torch.randn(fan_out, args.rank, generator=gen) * 0.01
    folder = Path(tempfile.mkdtemp()) / "adapter"
    write_adapter(folder, config, tensors)
    file_bytes = (folder / "adapter_model.safetensors").stat().st_size
    layout = BaseLayout(layout_targets, args.hidden, max_rank=64)
    spec = build_spec("bench", load_peft(folder, header_only=True), layout)
    pool = torch.zeros(spec.num_pages, args.hidden, dtype=torch.bfloat16)
    index = torch.arange(spec.num_pages)

    disk, pool_write = [], []
    load_peft(folder)                       # warm the page cache
    for _ in range(args.repeats):
        started = time.perf_counter()
        pages = file_pages(spec, folder, torch.bfloat16)      # the loader thread's work
        disk.append(time.perf_counter() - started)
        started = time.perf_counter()
        pool.index_copy_(0, index, pages)
        pool_write.append(time.perf_counter() - started)
    result = {"file_bytes": file_bytes, "pages": spec.num_pages,
              "page_bytes_bf16": pages.numel() * pages.element_size(),
              "disk_to_pages_s": statistics.median(disk), "host_hit_s": 0.0,
              "pool_write_s": statistics.median(pool_write),
              "threads": torch.get_num_threads()}
    print(f"adapter: rank {args.rank}, {len(layout_targets)} modules, file "
          f"{file_bytes / 1e6:.1f} MB, {spec.num_pages} pages "
          f"({result['page_bytes_bf16'] / 1e6:.1f} MB in bf16)")
    print(f"  disk -> host pages (loader thread) {result['disk_to_pages_s'] * 1e3:8.1f} ms")
    print(f"  host-cache hit                      {0.0:8.1f} ms")
    print(f"  host pages -> pool (engine thread)  {result['pool_write_s'] * 1e3:8.1f} ms")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
