"""What `bench methods` trains: the LoRA paper's studies as lists of runs, and how the runs'
results group into the cells of its tables.

- Table 6 (rank): Wq, Wq+Wv and all four attention matrices at r in {1, 2, 4, 8, 64}.
- Table 5 (which matrices): a fixed budget: one matrix at r=8, two at r=4, four at r=2.
- Sec. 7: Wq+Wv adapters at r = 4, 8, 64 (and a second seed of r = 64), trained longer.
- Tables 2-3 (methods): each baseline's sweep at seed 0, selected on the validation split; the
  selected configuration then gets the other seeds, and its test BLEU is reported.

alpha is FIXED across ranks (ALPHA), as in the paper, which sets alpha to the first r it tries
and does not tune it: the update is scaled by alpha / r, so 8 at r = 1, 1 at r = 8 and 0.125 at
r = 64. The learning rate is the same for every LoRA cell (LORA_LR), not tuned per rank.
"""
from __future__ import annotations

from dataclasses import dataclass, field

ALPHA = 8.0
LORA_LR = 1e-2
RANKS = (1, 2, 4, 8, 64)
TARGETS = {"Wq": "q", "Wk": "k", "Wv": "v", "Wo": "o", "Wq,Wk": "q,k", "Wq,Wv": "q,v",
           "Wq,Wk,Wv,Wo": "q,k,v,o"}
RANK_TARGETS = ("Wq", "Wq,Wv", "Wq,Wk,Wv,Wo")
# one matrix r=8, two r=4, four r=2: the same trainable budget per layer for square matrices
BUDGET_CELLS = (("Wq", 8), ("Wk", 8), ("Wv", 8), ("Wo", 8), ("Wq,Wk", 4), ("Wq,Wv", 4),
                ("Wq,Wk,Wv,Wo", 2))
SEC7_RANKS = (4, 8, 64)

# The baselines' sweeps: (method label, [(configuration label, overrides)]): full fine-tuning
# over learning rates, prefix and prompt tuning over virtual tokens (Li & Liang used 5-200
# prefix tokens, Lester et al. 1-150 prompt ones), BitFit over learning rates. Kept small so
# the whole command fits a 2-core CPU shared with other jobs.
BASELINE_SWEEPS = [
    ("full fine-tuning", [(f"lr {lr:g}", {"method": "full", "lr": lr})
                          for lr in (3e-4, 1e-3, 3e-3, 1e-2)]),
    ("prefix tuning (MLP reparam.)", [
        (f"{n} tokens, lr 0.01", {"method": "prefix", "prefix_projection": True,
                                  "virtual_tokens": n, "lr": 1e-2}) for n in (5, 10, 20, 40)]),
    ("prompt tuning (vocab init)", [
        (f"{n} tokens, lr 0.03", {"method": "prompt", "virtual_tokens": n, "lr": 3e-2})
        for n in (8, 16, 32)]),
    ("adapter (Houlsby)", [("bottleneck 16, lr 0.01", {"method": "adapter", "bottleneck": 16,
                                                       "lr": 1e-2})]),
    ("adapter (Lin)", [("bottleneck 16, lr 0.01", {"method": "adapter", "bottleneck": 16,
                                                   "adapter_variant": "lin", "lr": 1e-2})]),
    ("BitFit", [(f"lr {lr:g}", {"method": "bitfit", "lr": lr}) for lr in (1e-2, 3e-2)]),
]
# LoRA rows shown beside the baselines (taken from the rank study: no extra runs)
LORA_IN_METHODS = (("Wq,Wv", 4), ("Wq,Wv", 8), ("Wq,Wk,Wv,Wo", 2), ("Wq,Wk,Wv,Wo", 8))


def lora(weights: str, r: int) -> dict:
    return {"method": "lora", "targets": TARGETS[weights], "r": r, "alpha": ALPHA,
            "lr": LORA_LR}


@dataclass(frozen=True)
class Run:
    """One training run. `key` identifies it across studies (a cell two studies share trains
    once) and across invocations (resume)."""
    overrides: tuple  # sorted (key, value) pairs of TrainConfig overrides
    seed: int
    steps: int
    eval_every: int = 0

    @property
    def key(self) -> str:
        parts = [f"{k}={v}" for k, v in self.overrides]
        return "|".join(parts + [f"steps={self.steps}", f"seed={self.seed}"])

    def spec_overrides(self) -> dict:
        extra = {"eval_every": self.eval_every} if self.eval_every else {}
        return {**dict(self.overrides), "seed": self.seed, **extra}


def make_run(overrides: dict, seed: int, steps: int, eval_every: int = 0) -> Run:
    return Run(tuple(sorted(overrides.items())), seed, steps, eval_every)


@dataclass
class Plan:
    seeds: tuple[int, ...]
    steps: int
    sec7_steps: int
    sec7_eval_every: int
    ranks: tuple[int, ...] = RANKS
    rank_targets: tuple[str, ...] = RANK_TARGETS
    budget_cells: tuple = BUDGET_CELLS
    sweeps: list = field(default_factory=lambda: BASELINE_SWEEPS)

    def rank_cells(self) -> list[tuple[str, int]]:
        return [(w, r) for w in self.rank_targets for r in self.ranks]

    def lora_runs(self, study: str) -> list[Run]:
        cells = self.rank_cells() if study == "rank" else list(self.budget_cells)
        return [make_run(lora(w, r), s, self.steps) for w, r in cells for s in self.seeds]

    def sec7_runs(self) -> dict[str, Run]:
        """{name: run}: Wq,Wv at each SEC7 rank (seed 0) and a second seed of r = 64."""
        runs = {f"r={r}": make_run(lora("Wq,Wv", r), 0, self.sec7_steps, self.sec7_eval_every)
                for r in SEC7_RANKS}
        runs["r=64 seed 1"] = make_run(lora("Wq,Wv", 64), 1, self.sec7_steps,
                                       self.sec7_eval_every)
        return runs

    def sweep_runs(self) -> list[Run]:
        return [make_run(o, self.seeds[0], self.steps) for _, configs in self.sweeps
                for _, o in configs]

    def final_runs(self, results: dict, seeds: tuple[int, ...] | None = None) -> list[Run]:
        """The other seeds (or `seeds`) of each sweep's selected configuration (needs the sweep
        results)."""
        runs = []
        for _, configs in self.sweeps:
            best = select(configs, results, self)
            if best is not None:
                runs += [make_run(configs[best][1], s, self.steps)
                         for s in (self.seeds[1:] if seeds is None else seeds)]
        return runs


def default_plan() -> Plan:
    return Plan(seeds=(0, 1, 2), steps=120, sec7_steps=600, sec7_eval_every=100)


def quick_plan() -> Plan:
    """Every code path, a few runs: for the test and a smoke check."""
    return Plan(seeds=(0, 1), steps=4, sec7_steps=6, sec7_eval_every=3, ranks=(1, 8),
                rank_targets=("Wq,Wv",), budget_cells=(("Wq", 8), ("Wq,Wv", 4)),
                sweeps=[("prompt tuning (vocab init)", [
                            (f"{n} tokens", {"method": "prompt", "virtual_tokens": n,
                                             "lr": 3e-2}) for n in (2, 4)]),
                        ("BitFit", [("lr 0.01", {"method": "bitfit", "lr": 1e-2})])])


def select(configs: list, results: dict, plan: Plan) -> int | None:
    """Index of the configuration with the best validation BLEU at the first seed (ties: the
    first listed); None while none has finished."""
    best, best_val = None, None
    for i, (_, overrides) in enumerate(configs):
        r = results.get(make_run(overrides, plan.seeds[0], plan.steps).key)
        if r and "error" not in r and (best_val is None or r["val_bleu"] > best_val):
            best, best_val = i, r["val_bleu"]
    return best
