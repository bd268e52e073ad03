"""`lorafleet demo` (`make demo`): the whole idea in a few minutes on a CPU.

One small base model (shipped in the package), one LoRA adapter trained per task, one server
holding all of them, concurrent requests to every adapter and to the bare base, a table of what
each answered and how well; then one adapter merged into the base, answering identically with no
LoRA code left in the model.
"""
from __future__ import annotations

import shutil
import sys
import textwrap
import time
from pathlib import Path


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("demo", help="train an adapter per task on the embedded base model, "
                              "serve them all, compare with the base, merge one")
    p.add_argument("--work", type=Path, default=Path("out/demo"), help="working folder")
    p.add_argument("--base", type=Path, default=None, help="base model folder (default: the "
                   "embedded Shakespeare/Milton Llama)")
    p.add_argument("--steps", type=int, default=None, help="training steps per adapter")
    p.add_argument("--tests", type=int, default=None, help="held-out prompts per task")
    p.add_argument("--tasks", default="e2e,json,upper",
                   help="comma-separated, from e2e, json, upper, reverse")
    p.add_argument("--show", type=int, default=3,
                   help="table rows per task and model (scores use every held-out prompt)")
    p.add_argument("--threads", type=int, default=0,
                   help="torch threads for training and merging (0: torch's default); 1 is "
                        "faster on a machine busy with other jobs")
    p.add_argument("--lr", type=float, default=None, help="adapter learning rate")
    p.add_argument("--rank", type=int, default=None, help="LoRA rank r")
    p.add_argument("--quick", action="store_true",
                   help="a smoke run: few steps and prompts (the pipeline, not the quality)")
    p.add_argument("--no-check", action="store_true",
                   help="exit 0 even if an adapter does not beat the base on its task")
    p.set_defaults(func=run)


def say(step: str, text: str) -> None:
    print(f"\n== {step}: {text}", flush=True)


def _short(text: str, width: int) -> str:
    text = text.replace("\n", " | ")
    return text if len(text) <= width else text[:width - 3] + "..."


def run(args) -> int:
    from tqdm import tqdm

    import logging

    from lorafleet.demo import pipeline as pl
    # one line per HTTP request would bury the table
    logging.getLogger("httpx").setLevel(logging.WARNING)
    from lorafleet.demo.tasks import TASKS

    if args.threads:
        import torch
        torch.set_num_threads(args.threads)
    options = {"work": args.work, "tasks": tuple(t.strip() for t in args.tasks.split(","))}
    if args.base is not None:
        options["base"] = args.base
    if args.quick:
        options.update(steps=8, n_test=2, n_train=64, max_tokens=12)
    if args.steps is not None:
        options["steps"] = args.steps
    if args.lr is not None:
        options["lr"] = args.lr
    if args.rank is not None:
        options["r"], options["alpha"] = args.rank, 2.0 * args.rank
    if args.tests is not None:
        options["n_test"] = args.tests
    options["merge_task"] = "json" if "json" in options["tasks"] else options["tasks"][0]
    cfg = pl.DemoConfig(**options)
    started = time.perf_counter()
    if cfg.work.exists():
        shutil.rmtree(cfg.work / "runs", ignore_errors=True)

    say("1/5 data", f"generating {cfg.n_train} training and {cfg.n_test} held-out examples for "
        f"each task into {cfg.work / 'data'}")
    data = pl.prepare_data(cfg)
    for task, (path, tests) in data.items():
        print(f"  {task:8s} {TASKS[task].description:40s} e.g. {_short(tests[0].prompt, 60)!r} "
              f"-> {_short(tests[0].completion, 50)!r}")

    say("2/5 training", f"one LoRA adapter per task on {cfg.base} (r={cfg.r}, alpha={cfg.alpha}, "
        f"targets={cfg.targets}, {cfg.steps} steps of {cfg.batch_size}, bf16 autocast)")
    bars: dict = {}

    def on_event(event: dict) -> None:
        task = event.get("task")
        if event["type"] == "train_start":
            bars[task] = tqdm(total=event["total_steps"], desc=f"  {task:8s}", unit="step",
                              file=sys.stdout, dynamic_ncols=True, leave=True)
        elif event["type"] == "step":
            bars[task].update(1)
            bars[task].set_postfix(loss=f"{event['loss']:.3f}")
        elif event["type"] == "train_end":
            bars[task].close()

    adapters = pl.train_adapters(cfg, data, on_event)
    for task, path in adapters.items():
        print(f"  {task:8s} -> {path}")

    port = pl.free_port()
    say("3/5 serving", f"lorafleet serve on 127.0.0.1:{port} with the base model and "
        f"{len(adapters)} adapters ({', '.join(adapters)}); log: {cfg.work / 'server.log'}")
    t0 = time.perf_counter()
    server = pl.start_server(cfg.base, adapters, port, cfg.work / "server.log")
    print(f"  ready in {time.perf_counter() - t0:.1f} s")
    try:
        models = [*adapters, pl.BASE_NAME]
        n = sum(len(t) for _, t in data.values()) * len(models)
        say("4/5 requests", f"{n} concurrent completions over HTTP: every held-out prompt to "
            f"each adapter and to the bare base (greedy, max {cfg.max_tokens} tokens)")
        t0 = time.perf_counter()
        rows = pl.query_all(f"http://127.0.0.1:{port}", data, models, cfg.max_tokens)
        print(f"  {n} requests answered in {time.perf_counter() - t0:.1f} s")
    finally:
        pl.stop_server(server)

    examples = {e.prompt: e for _, tests in data.values() for e in tests}
    print()
    header = f"{'task':8s} {'model':8s} {'score':>6s} {'partial':>7s}  {'prompt':34s} output"
    print(header)
    print("-" * 140)
    shown: dict = {}
    for task in data:
        for row in rows:
            if row.task != task:
                continue
            shown[task, row.model] = shown.get((task, row.model), 0) + 1
            if shown[task, row.model] > args.show:
                continue
            example = examples[row.prompt]
            print(f"{task:8s} {row.model:8s} {pl.row_score(row, example):6.1f} "
                  f"{pl.row_partial(row, example):7.1f}  {_short(row.prompt, 34):34s} "
                  f"{_short(row.output.strip(), 80)}")
        print()
    scores = pl.score_rows(rows, data)
    partial = pl.score_rows(rows, data, metric=pl.partial_score)
    print(f"(first {args.show} of {cfg.n_test} prompts per task and model shown)\n")
    print(f"task scores on {cfg.n_test} held-out prompts per task: BLEU for e2e; exact match % "
          "(and partial credit: % of JSON fields / word positions right) for the others")
    print(f"  {'task':8s} " + " ".join(f"{m:>14s}" for m in models))
    wins = []
    for task, by_model in scores.items():
        cells = [f"{by_model[m]:6.1f}" + (f" ({partial[task][m]:5.1f})"
                                          if TASKS[task].metric != "bleu" else " " * 8)
                 for m in models]
        print(f"  {task:8s} " + " ".join(f"{c:>14s}" for c in cells))
        # exact match of a 5M model after a minute of training can be 0 on a handful of
        # prompts; partial credit shows the adapter learned its task where the base did not.
        wins.append(by_model[task] >= by_model[pl.BASE_NAME]
                    and partial[task][task] > partial[task][pl.BASE_NAME])

    task = cfg.merge_task
    say("5/5 merge", f"merging the {task!r} adapter into the base weights (W = W0 + s B A) and "
        f"removing the LoRA layers; same greedy prompts, in-process")
    check = pl.merge_and_compare(cfg, adapters[task], data[task][1])
    served = [r.output for r in rows if r.task == task and r.model == task]
    for out_lora, out_merged in zip(check.outputs_lora, check.outputs_merged):
        mark = "==" if out_lora == out_merged else "!="
        print(f"  {_short(out_lora.strip(), 60):60s} {mark} {_short(out_merged.strip(), 60)}")
    same_served = sum(a.strip() == b.strip() for a, b in zip(served, check.outputs_merged))
    print(f"  merged == unmerged: {check.identical} ({len(check.outputs_merged)} prompts); "
          f"merged == served over HTTP: {same_served}/{len(served)}")
    print(f"  decode time per token: {check.ms_per_token_lora:.2f} ms with LoRA layers, "
          f"{check.ms_per_token_merged:.2f} ms merged")

    elapsed = time.perf_counter() - started
    ok = all(wins) and check.identical
    print(textwrap.dedent(f"""
        done in {elapsed / 60:.1f} min: {sum(wins)}/{len(wins)} adapters beat the base on their
        task; merged output identical: {check.identical}. Adapters (PEFT format) are in
        {cfg.work / 'runs'}; try `lorafleet analyze {adapters[task]} --base {cfg.base}`."""))
    if args.quick or args.no_check:
        return 0
    return 0 if ok else 1
