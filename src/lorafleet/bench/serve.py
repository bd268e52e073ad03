"""The S-LoRA workload on lorafleet's engine with adapters beyond memory, against the ways people
serve many adapters today.

    lorafleet bench serve [--adapters 10,100,1000,5000] [--requests 1000] [--rate 100]
                          [--json docs/results/serve-DATE.json] [--plot-dir docs/img]
    lorafleet bench serve --report docs/results/serve-*.json [--update-doc docs/benchmarks.md]
    lorafleet bench serve --tensor-parallel-size 2 [--json docs/results/serve-tp.json]
        (the tensor-parallel benchmark, serve_tp.py: N ranks against one process)

Over ~400 lines because it is the sweep's one plan: which runs, in which order, with which
budget; the run worker, baselines, trace and report already live in their own files.

Setup: a random Llama (hidden 1024, 4 layers, GQA, saved in bf16) and a store of random PEFT
adapter folders on disk (ranks 8-64, a quarter on every linear layer, the rest on q,k,v,o:
workloads.py). Each run registers the store's first N adapters (lazily where the engine can:
headers only) and replays a trace of Poisson arrivals with power-law or uniform popularity, in
its own process (serve_run.py: peak RSS per run). The engine runs with its defaults
(`EngineConfig()`, the out-of-the-box configuration a user gets) unless a row says otherwise.

Runs, in this order (so that a run cut short has the most important ones):
1. base model only and lorafleet for each N and popularity, at the saturating rate --rate;
2. a hand-sized configuration (--hand-config) beside the default, at --hand-adapters;
3. merge-and-swap and PEFT per-row on a subset (--merge-swap-requests, --peft-requests);
4. the heavy mix (64 running, long prompts, ranks up to 64 on q,k,v,o: --heavy-requests);
5. the rate sweep at N = --rate-adapters: fractions (--rate-fractions) of the base model's
   measured request rate, both popularities;
6. the base model again (the machine's drift over the run; left out of the ratios).
The machine's roofline (bf16 matmul, memory copy) is measured at the start and the end.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

from .doc_block import write_json
from .serve_report import best_runs, markdown, plot, update_doc
from .workloads import (ALL_LINEAR_SHARE, ATTENTION, RANKS, adapter_name, adapter_spec,
                        link_store, make_random_llama, write_adapter_store)

__all__ = ["add_arguments", "run", "best_runs"]


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--report", type=Path, nargs="+", default=None,
                        help="only render tables and plots from these results JSON files")
    parser.add_argument("--update-doc", type=Path, default=None,
                        help="with --report: replace the generated section of this markdown")
    parser.add_argument("--adapters", default="10,100,1000,5000",
                        help="comma-separated numbers N of adapters in the store")
    parser.add_argument("--popularity", default="power-law,uniform")
    parser.add_argument("--requests", type=int, default=1000)
    parser.add_argument("--rate", type=float, default=100.0,
                        help="Poisson arrivals per second of the scaling runs (saturating)")
    parser.add_argument("--rate-adapters", type=int, default=1000,
                        help="N of the rate sweep (0 skips it)")
    parser.add_argument("--rate-fractions", default="0.3,0.6,0.9",
                        help="rates of the sweep, as fractions of the base model's req/s")
    parser.add_argument("--repeats", type=int, default=1,
                        help="run the scaling block (base model, then each N) this many times, "
                             "interleaved; tables give the best run and medians")
    parser.add_argument("--alpha", type=float, default=1.0, help="power-law exponent")
    parser.add_argument("--input-len", default="8,64", help="uniform range of prompt lengths")
    parser.add_argument("--output-len", default="8,32", help="uniform range of output lengths")
    parser.add_argument("--ranks", default=",".join(map(str, RANKS)))
    parser.add_argument("--slo-ttft", type=float, default=1.0,
                        help="SLO: first token within this many seconds of arrival")
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--heads", type=int, default=16)
    parser.add_argument("--kv-heads", type=int, default=4)
    parser.add_argument("--vocab", type=int, default=8192)
    parser.add_argument("--model-dtype", default="bfloat16", help="dtype the checkpoint declares")
    parser.add_argument("--engine", default="{}",
                        help="EngineConfig fields (JSON) of the main runs; {} = the defaults")
    parser.add_argument("--hand-config", default=None,
                        help="JSON EngineConfig of the hand-sized comparison rows (default: "
                             "bf16 with a pool sized for the batch's KV plus 200 mean adapters)")
    parser.add_argument("--hand-adapters", type=int, default=1000, help="0 skips the hand rows")
    parser.add_argument("--merge-swap-requests", type=int, default=200)
    parser.add_argument("--merge-swap-adapters", type=int, default=10)
    parser.add_argument("--peft-requests", type=int, default=128)
    parser.add_argument("--peft-adapters", type=int, default=10)
    parser.add_argument("--heavy-requests", type=int, default=256, help="0 skips the heavy mix")
    parser.add_argument("--heavy-adapters", type=int, default=100)
    parser.add_argument("--heavy-input-len", default="8,256")
    parser.add_argument("--heavy-output-len", default="16,64")
    parser.add_argument("--heavy-ranks", default="8,16,32,64")
    parser.add_argument("--threads", type=int, default=None, help="torch threads per run")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--work-dir", type=Path, default=None,
                        help="keep the model and the adapter store here (reused when present)")
    parser.add_argument("--note", action="append", default=[],
                        help="a line about the conditions of this run, kept in the JSON")
    parser.add_argument("--time-budget", type=float, default=None,
                        help="minutes: runs not started by then are skipped (listed in the "
                             "JSON and the report, never dropped silently)")
    parser.add_argument("--in-process", action="store_true",
                        help="run everything in this process (fast, for tests; peak RSS is then "
                             "the whole benchmark's, not each run's)")
    parser.add_argument("--json", "--out", dest="json", type=Path, default=None)
    parser.add_argument("--plot-dir", type=Path, default=None, help="PNG plots go here")
    parser.add_argument("--tensor-parallel-size", "-tp", type=int, default=1,
                        help="N > 1: run the tensor-parallel benchmark instead (serve_tp.py: "
                             "sizes 1 and N, communication per step, A100 estimate)")


def measure_roofline() -> dict:
    """bf16 matmul FLOP/s (2048^3, best of 5) and copy bandwidth (256 MB fp32 tensor, read +
    write bytes, best of 5): the machine's two ceilings (DESIGN.md sec. 4)."""
    import torch

    from .roofline import COPY_BYTES, copy_seconds, matmul_seconds

    return {"bandwidth_bytes_per_s": 2 * COPY_BYTES / min(copy_seconds(COPY_BYTES, 5)),
            "matmul_flops": 2 * 2048**3 / min(matmul_seconds(2048, torch.bfloat16, 5))}


def _loadavg() -> str:
    return " ".join(f"{x:.1f}" for x in os.getloadavg())


def _commit() -> str:
    """HEAD's short hash, with "+N uncommitted" when files of the package differ from it."""
    here = Path(__file__).parent
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                              text=True, cwd=here, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--", str(here.parent)],
                               capture_output=True, text=True, cwd=here, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    changed = len(dirty.splitlines())
    return head + (f" +{changed} uncommitted files" if changed else "")


def prepare(args, work: Path, counts: list[int]) -> dict:
    """The model and the adapter stores (one per N, hard links into the largest); reused when
    `work` already holds them for the same parameters."""
    from lorafleet.models import ModelConfig

    ranks = _ints(args.ranks)
    key = {k: getattr(args, k) for k in ("hidden", "layers", "heads", "kv_heads", "vocab",
                                         "model_dtype", "seed", "ranks")}
    key.update(largest=max(counts + [args.heavy_adapters]),
               heavy=[args.heavy_adapters, args.heavy_ranks])
    marker = work / "prepared.json"
    if marker.is_file() and json.loads(marker.read_text()).get("key") == key:
        return json.loads(marker.read_text())["info"]
    model_dir = work / "model"
    started = time.perf_counter()
    make_random_llama(model_dir, args.hidden, args.layers, args.heads, args.kv_heads,
                      args.vocab, args.model_dtype)
    config = ModelConfig.from_dict(json.loads((model_dir / "config.json").read_text()))
    largest = max(counts)
    full = work / "stores" / f"n{largest}"
    store = write_adapter_store(full, largest, config, args.seed, ranks)
    for n in counts:
        if n != largest:
            link_store(full, work / "stores" / f"n{n}", [adapter_name(i) for i in range(n)])
    heavy = {}
    if args.heavy_requests:
        heavy = write_adapter_store(work / "stores" / "heavy", args.heavy_adapters, config,
                                    args.seed, _ints(args.heavy_ranks), targets=ATTENTION)
    import math

    import safetensors

    with safetensors.safe_open(str(model_dir / "model.safetensors"), "pt") as f:
        params = sum(math.prod(f.get_slice(k).get_shape()) for k in f.keys())
    info = {"model": {"parameters": params, "dir": str(model_dir)},
            "store": store, "heavy_store": heavy, "prepare_s": time.perf_counter() - started}
    marker.write_text(json.dumps({"key": key, "info": info}))
    return info


def default_hand_config(args) -> dict:
    """bf16, 64 running sequences, a pool of the batch's KV at its longest plus 200 adapters of
    the mean size: a configuration sized by hand for this workload."""
    from lorafleet.models import ModelConfig

    from .workloads import adapter_pool_pages

    config = ModelConfig(hidden_size=args.hidden,
                         intermediate_size=int(args.hidden * 8 / 3) // 64 * 64,
                         num_hidden_layers=args.layers, num_attention_heads=args.heads,
                         num_key_value_heads=args.kv_heads, vocab_size=args.vocab)
    kv_dim = args.kv_heads * config.head_dim
    max_tokens = _ints(args.input_len)[1] + _ints(args.output_len)[1]
    kv_pages = 64 * (max_tokens + 16) * 2 * args.layers * kv_dim // args.hidden
    mean_adapter = sum(adapter_pool_pages(config, *adapter_spec(i, args.seed, _ints(args.ranks)))
                       for i in range(200)) / 200
    return {"dtype": "bfloat16", "max_num_seqs": 64, "num_pages": int(kv_pages +
                                                                      200 * mean_adapter)}


def plan(args, counts: list[int], popularities: list[str]) -> list[dict]:
    """Every run of the benchmark, in order, as specs for serve_run (rates of the rate sweep
    filled in once the base model's rate is measured)."""
    engine = json.loads(args.engine)
    specs = []
    for _ in range(max(1, args.repeats)):
        specs.append(dict(system="base-only", adapters=0, rate=args.rate, sweep="scaling",
                          engine=engine))
        for n in counts:
            for popularity in popularities:
                specs.append(dict(system="lorafleet", adapters=n, popularity=popularity,
                                  rate=args.rate, sweep="scaling", engine=engine))
    if args.hand_adapters:
        hand = json.loads(args.hand_config) if args.hand_config else default_hand_config(args)
        specs.append(dict(system="base-only", adapters=0, rate=args.rate, sweep="baselines",
                          engine=hand, config="hand-sized"))
        for popularity in popularities:
            specs.append(dict(system="lorafleet", adapters=args.hand_adapters,
                              popularity=popularity, rate=args.rate, sweep="baselines",
                              engine=hand, config="hand-sized"))
    if args.merge_swap_requests:
        specs.append(dict(system="merge-swap", adapters=args.merge_swap_adapters,
                          popularity="power-law", rate=args.rate, sweep="baselines",
                          engine=engine, requests=args.merge_swap_requests))
    if args.peft_requests:
        specs.append(dict(system="peft", adapters=args.peft_adapters, popularity="power-law",
                          rate=args.rate, sweep="baselines", engine={"max_num_seqs": 64},
                          requests=args.peft_requests))
    if args.heavy_requests:
        heavy = dict(json.loads(args.engine), max_num_seqs=64)
        for system, n in (("base-only", 0), ("lorafleet", args.heavy_adapters)):
            specs.append(dict(system=system, adapters=n, popularity="power-law" if n else None,
                              rate=1e6, sweep="heavy", workload="heavy", engine=heavy,
                              requests=args.heavy_requests))
    if args.rate_adapters:
        for fraction in _ints_or_floats(args.rate_fractions):
            for popularity in popularities:
                specs.append(dict(system="lorafleet", adapters=args.rate_adapters,
                                  popularity=popularity, rate_fraction=fraction, sweep="rate",
                                  engine=engine))
    specs.append(dict(system="base-only", adapters=0, rate=args.rate, sweep="scaling",
                      engine=engine, spread_check=True))
    for s in specs:
        s.setdefault("config", "default")
        s.setdefault("popularity", None)
        s.setdefault("workload", None)
    return specs


def _ints_or_floats(text: str) -> list[float]:
    return [float(x) for x in text.split(",") if x]


def full_spec(spec: dict, args, w: dict, info: dict, work: Path, roofline: dict) -> dict:
    """A planned run with everything its process needs: folders, trace, roofline, SLO."""
    n = spec["adapters"]
    heavy = spec["workload"] == "heavy"
    store = work / "stores" / ("heavy" if heavy else f"n{n}")
    return dict(spec, model_dir=info["model"]["dir"], store_dir=str(store), num_adapters=n,
                threads=args.threads, slo_ttft_s=args.slo_ttft,
                bandwidth=roofline["bandwidth_bytes_per_s"], flops=roofline["matmul_flops"],
                ranks=w["heavy_ranks"] if heavy else w["ranks"],
                targets=list(ATTENTION) if heavy else None,
                trace=dict(requests=spec.get("requests", args.requests),
                           input_len=w["heavy_input_len" if heavy else "input_len"],
                           output_len=w["heavy_output_len" if heavy else "output_len"],
                           vocab=args.vocab, seed=args.seed, alpha=args.alpha))


def snapshot_package(tmp: Path) -> Path:
    """A copy of the lorafleet package the runs import, so that every run of one benchmark
    measures the same code even while the working tree changes under it."""
    import shutil

    import lorafleet

    target = tmp / "code"
    shutil.copytree(Path(lorafleet.__file__).parent, target / "lorafleet",
                    ignore=shutil.ignore_patterns("__pycache__"))
    return target


def run_one(spec: dict, tmp: Path, in_process: bool = False, code: Path | None = None) -> dict:
    """One run in a fresh process (serve_run.py); its result dict, or the error it raised."""
    if in_process:
        from .serve_run import run as run_spec
        return run_spec(spec)
    spec_file, result_file = tmp / "spec.json", tmp / "result.json"
    result_file.unlink(missing_ok=True)
    spec_file.write_text(json.dumps(spec))
    env = dict(os.environ)
    if code is not None:
        env["PYTHONPATH"] = os.pathsep.join([str(code)] + [p for p in [env.get("PYTHONPATH")]
                                                           if p])
    proc = subprocess.run([sys.executable, "-m", "lorafleet.bench.serve_run", str(spec_file),
                           str(result_file)], capture_output=True, text=True, env=env)
    if proc.returncode != 0 or not result_file.is_file():
        return {"error": proc.stderr.strip().splitlines()[-1:] or ["no result"],
                "stderr_tail": proc.stderr[-2000:]}
    return json.loads(result_file.read_text())


def _line(r: dict) -> str:
    if "error" in r:
        return f"{r['system']:>10} N={r['adapters']:<5} FAILED: {r['error']}"
    return (f"{r['system']:>10} {r.get('config', ''):>10} N={r['adapters']:<5} "
            f"{(r.get('popularity') or ''):>9} rate {r['rate']:7.1f}: "
            f"{r['tokens_per_s']:7.1f} tok/s {r['requests_per_s']:5.2f} req/s TTFT p50/p99 "
            f"{r['p50_ttft_s'] or 0:.2f}/{r['p99_ttft_s'] or 0:.2f} s, distinct "
            f"{r.get('distinct_adapters')}, loads {r.get('loads')}, evictions "
            f"{r.get('evictions')}, RSS {r.get('peak_rss_bytes', 0) / 2**20:.0f} MiB, "
            f"{r['seconds']:.0f} s")


def tensor_parallel_args(args) -> argparse.Namespace:
    """`lorafleet bench serve --tensor-parallel-size N ...`: this benchmark at sizes 1 and N on
    `bench serve`'s model (its --hidden, --layers, --heads, --kv-heads, --vocab) with its
    --repeats, --json and --threads (the one-process runs); --requests and --adapters where
    changed from bench serve's defaults (there they size a Poisson trace and a store of
    thousands), else this benchmark's (32 requests at once, 16 adapters)."""
    from . import serve_tp

    def parse(add, argv):
        parser = argparse.ArgumentParser()
        add(parser)
        return parser.parse_args(argv)

    serve_defaults = vars(parse(add_arguments, []))
    tp = parse(serve_tp.add_arguments, [])
    for key in ("hidden", "layers", "heads", "kv_heads", "vocab", "repeats", "json"):
        setattr(tp, key, getattr(args, key))
    if args.requests != serve_defaults["requests"]:
        tp.requests = args.requests
    if args.adapters != serve_defaults["adapters"]:     # "10,100": the largest
        tp.adapters = max(int(n) for n in args.adapters.split(",") if n)
    if args.threads is not None:
        tp.single_threads = [args.threads]
    tp.sizes = [1, args.tensor_parallel_size]
    tp.update_doc = args.update_doc
    return tp


def run(args) -> int:
    from lorafleet.bench import progress_for

    if args.report:
        return report(args)
    if args.tensor_parallel_size > 1:
        from . import serve_tp
        return serve_tp.run(tensor_parallel_args(args))
    counts, popularities = _ints(args.adapters), [p for p in args.popularity.split(",") if p]
    started = time.perf_counter()
    results = {"started": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
               "commit": _commit(), "notes": list(args.note),
               "workload": {k: v for k, v in vars(args).items()
                            if k not in ("json", "plot_dir", "report", "update_doc", "work_dir",
                                         "note", "func", "in_process", "no_progress")
                            and not callable(v)},
               "runs": []}
    w = results["workload"]
    for k in ("input_len", "output_len", "ranks", "heavy_input_len", "heavy_output_len",
              "heavy_ranks"):
        w[k] = _ints(w[k])
    w["all_linear_share"] = ALL_LINEAR_SHARE
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    roofline = measure_roofline()
    results["machine"] = dict(roofline, cpus=os.cpu_count(), threads=torch.get_num_threads(),
                              loadavg_start=_loadavg())
    print(f"roofline: bf16 matmul {roofline['matmul_flops'] / 1e9:.0f} GFLOP/s, copy "
          f"{roofline['bandwidth_bytes_per_s'] / 1e9:.1f} GB/s; load average {_loadavg()}",
          flush=True)
    with tempfile.TemporaryDirectory() as scratch:
        work = args.work_dir or Path(scratch)
        work.mkdir(parents=True, exist_ok=True)
        info = prepare(args, work, counts + ([args.rate_adapters] if args.rate_adapters
                                                   else []) +
                             ([args.hand_adapters] if args.hand_adapters else []) +
                             [args.merge_swap_adapters, args.peft_adapters])
        results.update(info)
        print(f"model {info['model']['parameters'] / 1e6:.1f}M parameters; store "
              f"{info['store']['count']} adapters, {info['store']['mean_bytes'] / 2**20:.2f} MiB "
              f"per folder on average ({info['store']['total_bytes'] / 1e9:.2f} GB)", flush=True)
        code = None if args.in_process else snapshot_package(Path(scratch))
        base_rps = None
        results["skipped"] = []
        specs = plan(args, counts, popularities)
        # every run is a fresh process (model load, adapters, trace): the bar counts runs
        bar = progress_for(args, "bench serve", "run") or (lambda done, total: None)
        for done, spec in enumerate(specs):
            bar(done, len(specs))
            over = args.time_budget and time.perf_counter() - started > 60 * args.time_budget
            if over or (spec.get("rate_fraction") and not base_rps):
                results["skipped"].append(dict(
                    {k: spec.get(k) for k in ("system", "adapters", "popularity", "rate",
                                              "rate_fraction", "sweep", "config", "workload")},
                    reason="time budget" if over else "no base-model rate measured"))
                continue
            if spec.get("rate_fraction"):
                spec["rate"] = round(spec["rate_fraction"] * base_rps, 2)
            full = full_spec(spec, args, w, info, work, roofline)
            result = run_one(full, Path(scratch), args.in_process, code)
            result.update({k: spec[k] for k in ("system", "adapters", "popularity", "rate",
                                                "sweep", "config", "workload")},
                          spread_check=spec.get("spread_check", False))
            results["runs"].append(result)
            print(_line(result), flush=True)
            if spec["system"] == "base-only" and spec["sweep"] == "scaling" and "error" not in \
                    result and base_rps is None:
                base_rps = result["requests_per_s"]
            results["total_s"] = time.perf_counter() - started
            if args.json:     # after every run: a run cut short keeps what it measured
                _write(results, args.json)
        bar(len(specs), len(specs))
    end = measure_roofline()
    results["machine"].update(matmul_flops_end=end["matmul_flops"],
                              bandwidth_bytes_per_s_end=end["bandwidth_bytes_per_s"],
                              loadavg_end=_loadavg())
    results["total_s"] = time.perf_counter() - started
    if args.json:
        _write(results, args.json)
    print(markdown(_ok(results), str(args.json or "-")))
    if args.plot_dir:
        plot(_ok(results), args.plot_dir)
    return 0


def _ok(results: dict) -> dict:
    return dict(results, runs=[r for r in results["runs"] if "error" not in r])


def _write(results: dict, path: Path) -> None:
    write_json(path, results, indent=1)


def report(args) -> int:
    generated = []
    for i, path in enumerate(args.report):
        results = _ok(json.loads(path.read_text()))
        generated.append((f"### From {path.name}\n\n" if i else "") + markdown(results, str(path)))
        if args.plot_dir and i == 0:       # the plots are the first file's
            plot(results, args.plot_dir, stem="serve")
    text = "\n".join(generated)
    print(text)
    if args.update_doc:
        update_doc(args.update_doc, text)
    return 0
