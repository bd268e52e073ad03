"""bench methods: the interval math against a scipy-free reference, the batched greedy decoder
against the one-prompt-at-a-time reference, the doc block rendered from JSON, and the quick
mode end to end (train, JSON, figures, block, --from-json, resume)."""
import json
import math
import random

import pytest

from lorafleet.analysis.stats import T975, mean_ci
from lorafleet.bench import methods, methods_report
from lorafleet.bench.methods_studies import lora, make_run, quick_plan


def t_quantile_975(df: int) -> float:
    """Reference: solve CDF(t) = 0.975 for Student's t by integrating its density (Simpson)
    and bisecting; independent of the table in analysis/stats.py."""
    c = math.gamma((df + 1) / 2) / (math.sqrt(df * math.pi) * math.gamma(df / 2))

    def cdf(x: float, n: int = 20000) -> float:      # 0.5 + integral_0^x of the density
        h = x / n
        f = [c * (1 + (i * h) ** 2 / df) ** (-(df + 1) / 2) for i in range(n + 1)]
        return 0.5 + h / 3 * (f[0] + f[-1] + 4 * sum(f[1:-1:2]) + 2 * sum(f[2:-1:2]))

    lo, hi = 0.0, 20.0
    for _ in range(50):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if cdf(mid) < 0.975 else (lo, mid)
    return (lo + hi) / 2


@pytest.mark.parametrize("df", [1, 2, 3, 4, 9, 29])
def test_t_table_matches_the_integrated_density(df):
    assert T975[df - 1] == pytest.approx(t_quantile_975(df), abs=2e-3)


def test_mean_ci_is_the_student_t_interval():
    values = [31.0, 35.5, 29.25]
    mean = sum(values) / 3
    s = math.sqrt(sum((v - mean) ** 2 for v in values) / 2)
    iv = mean_ci(values)
    assert iv.mean == pytest.approx(mean)
    assert iv.half_width == pytest.approx(t_quantile_975(2) * s / math.sqrt(3), rel=1e-3)
    assert mean_ci([4.0]).half_width is None and str(mean_ci([4.0])) == "4.0"


def test_greedy_batch_equals_one_prompt_at_a_time(llama_dir):
    """KV-cache path (LoRA inside the model) and recompute path (prompt tuning's wrapper)."""
    import torch

    from lorafleet.bench.methods_run import greedy_batch, greedy_complete
    from lorafleet.models import load_model, load_tokenizer
    from lorafleet.train.methods import MethodConfig, apply_method

    tok = load_tokenizer(llama_dir)
    rng = random.Random(0)
    prompts = [" ".join(rng.choice(["a", "bc", "def", "g h", "ij"]) for _ in range(rng.randint(
        2, 5))) for _ in range(9)]
    for cfg in (MethodConfig("lora", r=4), MethodConfig("prompt", virtual_tokens=3)):
        torch.manual_seed(0)
        model = apply_method(load_model(llama_dir), cfg).eval()
        for p in model.parameters():          # a non-trivial adapter (B starts at zero)
            if p.requires_grad:
                p.data.normal_(0, 0.5)
        expected = [greedy_complete(model, tok, p, 7) for p in prompts]
        assert greedy_batch(model, tok, prompts, 7) == expected
        assert any(expected)
        # rows that stop early (here: the first row's third token made the EOS) leave the
        # batch while the others go on
        stop = tok.encode(expected[0])[2]

        class EarlyStop:
            eos_token_id = stop
            encode, decode = tok.encode, tok.decode

        short = [greedy_complete(model, EarlyStop, p, 7) for p in prompts]
        assert greedy_batch(model, EarlyStop, prompts, 7) == short
        assert len(short[0]) < len(expected[0]) and short != expected


def _fake_results(plan, rng):
    runs = {}
    for study in ("rank", "matrices"):
        for r in plan.lora_runs(study):
            runs[r.key] = {"trainable": dict(r.overrides)["r"] * 100,
                           "bleu": rng.uniform(0, 60), "val_bleu": rng.uniform(0, 60),
                           "train_loss": 1.0, "val_loss": 1.1, "ms_per_step": 100,
                           "peak_rss_mb": 700, "state_mb": 19.0}
    for r in plan.sweep_runs():
        runs[r.key] = {"trainable": 10, "bleu": rng.uniform(0, 60), "val_bleu": rng.uniform(0, 60),
                       "train_loss": 1.0, "ms_per_step": 100, "peak_rss_mb": 700, "state_mb": 19}
    for r in plan.final_runs(runs):
        runs[r.key] = {"trainable": 10, "bleu": rng.uniform(0, 60), "val_bleu": 1.0,
                       "train_loss": 1.0, "ms_per_step": 100, "peak_rss_mb": 700, "state_mb": 19}
    return runs


def _ci_cell(values):
    n = len(values)
    mean = sum(values) / n
    s = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))
    return f"{mean:.1f} ± {t_quantile_975(n - 1) * s / math.sqrt(n):.1f}"


def test_block_is_rendered_from_the_json_alone(tmp_path):
    plan = quick_plan()
    runs = _fake_results(plan, random.Random(1))
    data = {"command": "lorafleet bench methods --quick", "runs": runs,
            "config": {"quick": True, "seeds": list(plan.seeds), "steps": plan.steps,
                       "sec7_steps": plan.sec7_steps, "batch_size": 8, "n_train": 64,
                       "n_val": 3, "n_test": 3, "jobs": 2, "threads": 1, "cpus": 2},
            "timing": {"wall_s_total": 600.0, "runs_total": 17, "invocations": [{}]}}
    paper = tmp_path / "paper.md"
    paper.write_text(f"intro\n{methods.PAPER_BEGIN}\nold\n{methods.PAPER_END}\noutro\n")
    methods_report.write_paper_section(paper, data)
    text = paper.read_text()
    assert text.startswith("intro\n") and text.endswith("\noutro\n") and "\nold\n" not in text
    # every LoRA cell: mean and 95% t interval over its seeds, recomputed here
    for weights, r in [*plan.rank_cells(), *plan.budget_cells]:
        values = [runs[make_run(lora(weights, r), s, plan.steps).key]["bleu"]
                  for s in plan.seeds]
        assert f"| {weights} | {r} | {r * 100:,} | {_ci_cell(values)} |" in text
    # each sweep's selected configuration is the best on val, reported on test
    for label, configs in plan.sweeps:
        vals = [runs[make_run(o, 0, plan.steps).key]["val_bleu"] for _, o in configs]
        name, overrides = configs[vals.index(max(vals))]
        test = [runs[make_run(overrides, s, plan.steps).key]["bleu"] for s in plan.seeds]
        assert f"| {label} | {name} | 10 | {_ci_cell(test)} |" in text
    assert "10 min for 17 runs" in text


@pytest.mark.slow
def test_quick_mode_end_to_end(llama_dir, tmp_path):
    from lorafleet.cli import main

    out, paper = tmp_path / "methods.json", tmp_path / "docs" / "paper.md"
    paper.parent.mkdir()
    paper.write_text(f"# doc\n{methods.PAPER_BEGIN}\n{methods.PAPER_END}\n")
    assert main(["bench", "methods", "--quick", "--base", str(llama_dir), "--work",
                 str(tmp_path / "w"), "--json", str(out), "--paper", str(paper)]) == 0
    data = json.loads(out.read_text())
    plan = quick_plan()
    planned = [*plan.sec7_runs().values(), *plan.lora_runs("rank"),
               *plan.lora_runs("matrices"), *plan.sweep_runs(), *plan.final_runs(data["runs"])]
    assert {r.key for r in planned} <= set(data["runs"]) and not data["missing"]
    for r in data["runs"].values():
        assert "error" not in r, r
        assert 0.0 <= r["bleu"] <= 100.0 and r["peak_rss_mb"] > 50
    r1 = data["runs"][make_run(lora("Wq,Wv", 1), 0, plan.steps).key]
    assert r1["trainable"] == 2 * ((64 + 64) + (64 + 32))  # 2 layers; GQA v_proj out 32
    sec7 = data["sec7"]
    grid = sec7["phi"]["fig4"]["model.layers.0.self_attn.q_proj"]
    assert len(grid) == 64 and len(grid[0]) == 64 and all(0 <= v <= 1.0001 for v in grid[0])
    assert {t["adapter"] for t in sec7["table7"]} == {"r=4", "r=64"}
    for t in sec7["table7"]:   # ||U^T W V^T|| with W's own directions is the largest possible
        assert t["w_dirs"] >= t["dw_dirs"] - 1e-9 and t["w_dirs"] <= t["w_norm"] + 1e-9
    block = paper.read_text()
    assert "**Rank** (LoRA paper Table 6)" in block and "**Table 7**" in block
    for png in ("methods_phi_fig3.png", "methods_phi_fig4.png", "methods_spectra_r4.png"):
        assert (paper.parent / "figures" / png).stat().st_size > 1000
    # the reader's path: the same block from the JSON alone
    again = tmp_path / "again" / "paper.md"
    again.parent.mkdir()
    again.write_text(f"# doc\n{methods.PAPER_BEGIN}\n{methods.PAPER_END}\n")
    assert main(["bench", "methods", "--from-json", str(out), "--paper", str(again)]) == 0
    assert again.read_text() == block
    # resume: nothing left to run, one more invocation recorded
    assert main(["bench", "methods", "--quick", "--base", str(llama_dir), "--only", "rank",
                 "--work", str(tmp_path / "w"), "--json", str(out)]) == 0
    data2 = json.loads(out.read_text())
    assert data2["runs"] == data["runs"] and len(data2["timing"]["invocations"]) == 2
    assert data2["timing"]["invocations"][1]["runs"] == 0
