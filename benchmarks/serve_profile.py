"""Where a serving run's time goes: the base model, N = 5000 uniform and N = 10 uniform on the
same trace (the benchmark's first REQUESTS requests), one torch thread, under cProfile (wall
time of the main thread by function; process and main-thread CPU time, whose difference is the
adapter loader thread).

    python benchmarks/serve_profile.py REQUESTS WORK_DIR OUT.json

WORK_DIR: the --work-dir of `lorafleet bench serve` (model/ and stores/nN/).
"""
import cProfile
import json
import pstats
import sys
import time

from lorafleet.bench import serve_run
import torch
torch.set_num_threads(1)
out = {}
for system, n, pop in (("base-only", 0, None), ("lorafleet", 5000, "uniform"), ("lorafleet", 10, "uniform")):
    spec = dict(system=system, adapters=n, num_adapters=n, popularity=pop, rate=100.0, engine={},
                model_dir=f"{sys.argv[2]}/model", store_dir=f"{sys.argv[2]}/stores/n{n}", threads=1, slo_ttft_s=1.0,
                bandwidth=27e9, flops=290e9, ranks=[8, 16, 32, 64], targets=None,
                trace=dict(requests=int(sys.argv[1]), input_len=[8, 64], output_len=[8, 32], vocab=8192, seed=0, alpha=1.0))
    prof = cProfile.Profile()
    t0, c0 = time.thread_time(), time.process_time()
    prof.enable()
    r = serve_run.run(spec)
    prof.disable()
    main_cpu, all_cpu = time.thread_time() - t0, time.process_time() - c0
    st = pstats.Stats(prof)
    rows = {}
    for (f, line, fn), (cc, nc, tt, ct, callers) in st.stats.items():
        key = f"{f.split('/')[-1]}:{fn}"
        rows[key] = (rows.get(key, (0, 0))[0] + tt, rows.get(key, (0, 0))[1] + ct)
    pick = {k: v for k, v in rows.items() if any(s in k for s in (
        "sgmv_cpu.py:sgmv_cpu", "_linear_pointwise", "paged_decode_attention", "runner.py:run",
        "engine.py:step", "scheduler.py:schedule", "lora_batch.py", "lora_ops.py:forward",
        "adapter_cache.py", "drive", "scaled_dot_product"))}
    top = sorted(rows.items(), key=lambda kv: -kv[1][0])[:15]
    out[f"{system}-{n}"] = dict(tokens=r["tokens"], tokens_per_cpu_s=r["tokens_per_cpu_s"], cpu_s=all_cpu,
                                main_thread_cpu_s=main_cpu, loads=r.get("loads"), decode_adapters=r.get("decode_adapters"),
                                decode_batch=r.get("decode_batch"), steps=r.get("steps"),
                                picked={k: [round(v[0], 2), round(v[1], 2)] for k, v in pick.items()},
                                top_tottime=[(k, round(v[0], 2)) for k, v in top])
    print(json.dumps(out[f"{system}-{n}"], indent=1), flush=True)
json.dump(out, open(sys.argv[3], "w"), indent=1)
