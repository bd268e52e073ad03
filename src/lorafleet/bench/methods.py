"""The LoRA paper's comparisons at small scale, done the way the paper did them, on the
embedded base model and the E2E-style data-to-text task:

- Tables 5 and 6 (which matrices, which rank) with alpha fixed across ranks, several seeds per
  cell and a 95% interval (methods_studies.py lists the runs);
- Sec. 7 (subspace similarity, Table 7) on adapters trained to convergence (methods_sec7.py);
- Tables 2-3: the baselines, each with a sweep selected on a validation split.

Every run is a child process (methods_run.py) so that its peak resident memory (ru_maxrss, from
os.wait4) is its own, and `--jobs N` runs N of them at once. Results are merged into the JSON
after every run, so an interrupted command resumes where it stopped (`--only` runs a subset);
docs/paper.md's block is rendered from the JSON alone (methods_report.py, `--from-json`).

    lorafleet bench methods --jobs 2 --json docs/results/methods.json --paper docs/paper.md
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from lorafleet.bench.methods_report import PAPER_BEGIN, PAPER_END, plan_of  # noqa: F401
from lorafleet.bench.methods_run import TEST_FILE, TRAIN_FILE, VAL_FILE, run_one, write_examples
from lorafleet.bench.methods_studies import ALPHA, LORA_LR, Run, default_plan, quick_plan
from lorafleet.errors import ConfigError

STUDIES = ("sec7", "rank", "matrices", "baselines")
# settings that change what a run measures: a JSON made with others cannot be resumed
RESUME_KEYS = ("base", "steps", "batch_size", "n_train", "n_val", "n_test", "max_tokens",
               "seeds", "sec7_steps", "quick")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--base", type=Path, default=None, help="base model (default: embedded)")
    parser.add_argument("--steps", type=int, default=None, help="steps per run (default 120)")
    parser.add_argument("--sec7-steps", type=int, default=None,
                        help="steps of the sec. 7 adapters (default 600)")
    parser.add_argument("--seeds", type=int, default=None, help="seeds per cell (default 3)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--n-train", type=int, default=4000)
    parser.add_argument("--n-val", type=int, default=100)
    parser.add_argument("--n-test", type=int, default=200)
    parser.add_argument("--max-tokens", type=int, default=40)
    parser.add_argument("--jobs", type=int, default=2, help="runs at a time (child processes)")
    parser.add_argument("--only", default="", help="comma-separated studies to run: "
                        + ", ".join(STUDIES) + " (default: all)")
    parser.add_argument("--quick", action="store_true", help="a few runs of a few steps")
    parser.add_argument("--json", type=Path, default=None,
                        help="results JSON; merged into (resumed) when it exists")
    parser.add_argument("--fresh", action="store_true", help="ignore the runs in --json")
    parser.add_argument("--from-json", type=Path, default=None,
                        help="train nothing: render --paper's block and figures from this JSON")
    parser.add_argument("--paper", type=Path, default=None, help="write the markdown block "
                        "here (e.g. docs/paper.md); figures go to its figures/ folder")
    parser.add_argument("--work", type=Path, default=None,
                        help="keep data and every run's artifact here (default: a temp folder)")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)


# ---------------------------------------------------------------- running the children

def _slug(run: Run) -> str:
    method = dict(run.overrides).get("method", "run")
    return f"{method}-s{run.seed}-{hashlib.sha1(run.key.encode()).hexdigest()[:10]}"


def run_child(run: Run, common: dict) -> dict:
    """Train and score one run in a child process; its results plus its peak RSS."""
    work = Path(common["work"])
    slug = _slug(run)
    spec = {**common, "steps": run.steps, "overrides": run.spec_overrides(),
            "out": str(work / "runs" / slug), "result": str(work / "results" / f"{slug}.json")}
    out_file, err_file = Path(spec["result"]), work / "logs" / f"{slug}.txt"
    out_file.parent.mkdir(parents=True, exist_ok=True)
    err_file.parent.mkdir(parents=True, exist_ok=True)
    out_file.unlink(missing_ok=True)
    t0 = time.perf_counter()
    with err_file.open("w") as err:
        proc = subprocess.Popen([sys.executable, "-m", "lorafleet.bench.methods", "--child",
                                 json.dumps(spec)], stdout=subprocess.DEVNULL, stderr=err)
        # wait4, not wait: it returns this child's own resource usage (peak RSS).
        _, status, usage = os.wait4(proc.pid, 0)
    code = os.waitstatus_to_exitcode(status)
    base = {"key": run.key, **run.spec_overrides(), "wall_s": time.perf_counter() - t0}
    if code != 0 or not out_file.is_file():
        lines = err_file.read_text().strip().splitlines()
        return {**base, "error": lines[-1] if lines else f"exit {code}"}
    return {**base, **json.loads(out_file.read_text()), "peak_rss_mb": usage.ru_maxrss / 1024,
            "artifact": str(Path(spec["out"]) / "adapter")}


class Results:
    """The JSON document, written again after every finished run (resume point)."""

    def __init__(self, path: Path | None, data: dict, plan, args):
        self.path, self.data, self.lock = path, data, threading.Lock()
        self.plan, self.t0 = plan, time.perf_counter()
        timing = data.setdefault("timing", {"invocations": []})
        self.invocation = {"started": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
                           "wall_s": 0.0, "runs": 0, "only": args.only or "all",
                           "jobs": args.jobs}
        timing["invocations"].append(self.invocation)

    def add(self, run: Run, result: dict) -> None:
        with self.lock:
            self.data["runs"][run.key] = result
            self.invocation["runs"] += 1
            self.save()

    def save(self) -> None:
        """Timing and the list of missing runs are kept current, so that a command cut short
        leaves a JSON that says what it holds."""
        timing = self.data["timing"]
        self.invocation["wall_s"] = round(time.perf_counter() - self.t0, 1)
        timing["wall_s_total"] = round(sum(i["wall_s"] for i in timing["invocations"]), 1)
        timing["runs_total"] = sum(i["runs"] for i in timing["invocations"])
        self.data["missing"] = _missing(self.data, self.plan)
        if self.path is None:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.data, indent=1) + "\n")
        tmp.replace(self.path)


def execute(runs: list[Run], common: dict, results: Results, jobs: int) -> None:
    total = len(runs)
    counter = iter(range(1, total + 1))

    def one(run: Run) -> None:
        r = run_child(run, common)
        results.add(run, r)
        print(f"[{next(counter)}/{total}] {run.key}: " + (
            f"failed: {r['error']}" if "error" in r else
            f"test BLEU {r['bleu']:.1f}, val {r['val_bleu']:.1f}, {r['trainable']:,} trainable, "
            f"train {r['train_s']:.0f} s, eval {r['eval_s']:.0f} s"), flush=True)

    with ThreadPoolExecutor(max_workers=max(1, jobs)) as pool:
        list(pool.map(one, runs))


# ---------------------------------------------------------------- the command

def _command(args) -> str:
    parts = ["lorafleet bench methods"]
    if args.quick:
        parts.append("--quick")
    for flag in ("steps", "sec7_steps", "seeds", "only"):
        if getattr(args, flag):
            parts.append(f"--{flag.replace('_', '-')} {getattr(args, flag)}")
    parts.append(f"--jobs {args.jobs}")
    for flag in ("json", "paper"):
        if getattr(args, flag):
            parts.append(f"--{flag} {getattr(args, flag)}")
    return " ".join(parts)


def _prepare_data(work: Path, n_train: int, n_val: int, n_test: int) -> None:
    """Train, validation and test MRs, pairwise disjoint (tasks.make_split only excludes the
    first 1000 train prompts from its test stream, so we filter against all of them here)."""
    from lorafleet.demo.tasks import make_split, write_jsonl

    train = make_split("e2e", "train", n_train, seed=0)
    seen = {e.prompt for e in train}
    pool = make_split("e2e", "test", 2 * (n_val + n_test) + 50, seed=0)
    held_out = [e for e in pool if e.prompt not in seen][:n_test + n_val]
    if len(held_out) < n_test + n_val:
        raise ConfigError(f"could not draw {n_test} test + {n_val} validation MRs")
    write_jsonl(work / TRAIN_FILE, train)
    # test first: the test set is the same prefix of one stream whatever n_val is
    write_examples(work / TEST_FILE, held_out[:n_test])
    write_examples(work / VAL_FILE, held_out[n_test:])


def _load(args, config: dict) -> dict:
    fresh = {"command": _command(args), "config": config, "runs": {},
             "timing": {"invocations": []}}
    if args.json is None or args.fresh or not args.json.is_file():
        return fresh
    data = json.loads(args.json.read_text())
    for key in RESUME_KEYS:
        if data.get("config", {}).get(key) != config[key]:
            raise ConfigError(f"{args.json}: config.{key} is {data['config'].get(key)!r}, this "
                              f"run has {config[key]!r}; use the same settings to resume, or "
                              "--fresh (or another --json)")
    data["runs"] = {k: v for k, v in data.get("runs", {}).items() if "error" not in v}
    data["config"] = {**data["config"], "jobs": config["jobs"], "threads": config["threads"]}
    return data


def run(args) -> int:
    if args.child:
        spec = json.loads(args.child)
        Path(spec["result"]).write_text(json.dumps(run_one(spec)))
        return 0
    from lorafleet.bench.methods_report import write_paper_section

    if args.from_json:
        data = json.loads(args.from_json.read_text())
        if args.paper:
            write_paper_section(args.paper, data, args.paper.parent / "figures")
            print(f"wrote {args.paper}")
        return 0

    from lorafleet.demo.pipeline import default_base_model

    plan = quick_plan() if args.quick else default_plan()
    if args.quick:
        args.n_train, args.n_val, args.n_test, args.max_tokens = 64, 3, 3, 6
    plan.steps = args.steps or plan.steps
    plan.sec7_steps = args.sec7_steps or plan.sec7_steps
    if args.seeds:
        plan.seeds = tuple(range(args.seeds))
    if len(plan.seeds) < 2:
        raise ConfigError("--seeds must be >= 2 (an interval needs two values)")
    only = [s.strip() for s in args.only.split(",") if s.strip()]
    unknown = sorted(set(only) - set(STUDIES))
    if unknown:
        raise ConfigError(f"--only: unknown studies {unknown}; expected some of {STUDIES}")
    only = only or list(STUDIES)
    base = str(args.base or default_base_model())
    threads = max(1, (os.cpu_count() or 1) // max(1, args.jobs))
    config = {"base": "embedded" if args.base is None else base, "steps": plan.steps,
              "batch_size": args.batch_size, "n_train": args.n_train, "n_val": args.n_val,
              "n_test": args.n_test, "max_tokens": args.max_tokens, "seeds": list(plan.seeds),
              "sec7_steps": plan.sec7_steps, "sec7_eval_every": plan.sec7_eval_every,
              "quick": args.quick, "alpha": ALPHA, "lora_lr": LORA_LR, "jobs": args.jobs,
              "threads": threads, "cpus": os.cpu_count()}
    results = Results(args.json, _load(args, config), plan, args)
    work = args.work or Path(tempfile.mkdtemp(prefix="lorafleet-bench-methods-"))
    work.mkdir(parents=True, exist_ok=True)
    _prepare_data(work, args.n_train, args.n_val, args.n_test)
    common = {"base": base, "work": str(work), "batch_size": args.batch_size,
              "max_tokens": args.max_tokens, "threads": threads}

    # Phases, so that a run cut short still has every cell at its first seeds: the sec. 7
    # adapters (the longest runs, first so they do not trail), then every LoRA cell and every
    # baseline sweep at the first seed, then each further seed of the LoRA cells together with
    # that seed of each baseline's selected configuration (which needs the sweeps' results).
    sec7 = plan.sec7_runs()
    lora_runs = [r for study in ("rank", "matrices") if study in only
                 for r in plan.lora_runs(study)]
    done = results.data["runs"]
    phases = [lambda: list(sec7.values()) if "sec7" in only else [],
              lambda: [r for r in lora_runs if r.seed == plan.seeds[0]]
              + (plan.sweep_runs() if "baselines" in only else [])]
    for seed in plan.seeds[1:]:
        phases.append(lambda seed=seed: [r for r in lora_runs if r.seed == seed]
                      + (plan.final_runs(done, (seed,)) if "baselines" in only else []))
    n_run = 0
    for phase in phases:
        todo = list({r.key: r for r in phase() if r.key not in done}.values())
        print(f"{len(todo)} runs to run in this phase", flush=True)
        execute(todo, common, results, args.jobs)
        n_run += len(todo)
        if "sec7" in only and "sec7" not in results.data:
            _sec7(results, sec7, base)
    results.data["command"] = _command(args)
    results.save()
    wall = results.invocation["wall_s"]
    print(f"{n_run} runs in {wall / 60:.1f} min", flush=True)
    if args.paper:
        write_paper_section(args.paper, results.data, args.paper.parent / "figures")
        print(f"wrote {args.paper}")
    return 0


def _sec7(results: Results, sec7: dict, base: str) -> None:
    """The sec. 7 analyses, once every sec. 7 adapter is on disk (in --work)."""
    done = results.data["runs"]
    artifacts = {name: Path(done[r.key]["artifact"]) for name, r in sec7.items()
                 if r.key in done and Path(done[r.key].get("artifact", "")).is_dir()}
    if len(artifacts) == len(sec7):
        from lorafleet.bench import methods_sec7
        with results.lock:
            results.data["sec7"] = methods_sec7.compute(artifacts, base)
            results.save()


def _missing(data: dict, plan) -> list[str]:
    """Planned runs of the full command not in the JSON (for the doc's 'incomplete' line)."""
    done = data["runs"]
    planned = [*plan.sec7_runs().values(), *plan.lora_runs("rank"), *plan.lora_runs("matrices"),
               *plan.sweep_runs(), *plan.final_runs(done)]
    return sorted({r.key for r in planned if r.key not in done})


if __name__ == "__main__":
    p = argparse.ArgumentParser()
    add_arguments(p)
    sys.exit(run(p.parse_args()))
