"""bench inits: every init starts from the base's function (oracle: transformers' loss on the
same examples), the verdict logic, the paper-section writer, and a quick end-to-end run."""
import argparse
import json
import math

import pytest
import torch

from lorafleet.bench import inits
from lorafleet.demo.tasks import make_split
from lorafleet.errors import ConfigError
from lorafleet.models import load_tokenizer
from lorafleet.train.data import IGNORE_INDEX, tokenize_record


def _examples(llama_dir, n):
    tokenizer = load_tokenizer(llama_dir)
    return [tokenize_record(e.record(), tokenizer) for e in make_split("join", "train", n)]


def _transformers_loss(llama_dir, examples) -> float:
    """Mean next-token loss over the completion tokens, by transformers, one example at a time
    (no padding involved)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(llama_dir, torch_dtype=torch.float32).eval()
    total, tokens = 0.0, 0
    with torch.no_grad():
        for e in examples:
            labels = torch.tensor([e.labels])
            out = model(torch.tensor([e.input_ids]), labels=labels)
            n = int((labels[0, 1:] != IGNORE_INDEX).sum())
            total, tokens = total + out.loss.item() * n, tokens + n
    return total / tokens


@pytest.mark.parametrize("label", ["default", "pissa", "pissa_niter_4", "olora"])
def test_float_inits_start_at_the_base_loss_and_train(llama_dir, label):
    examples = _examples(llama_dir, 12)
    cfg = {"base": str(llama_dir), "r": 4, "targets": ["q_proj", "k_proj", "v_proj", "o_proj"],
           "steps": 3, "batch_size": 4, "lr": 1e-2, "warmup": 1,
           "pad_id": load_tokenizer(llama_dir).eos_token_id}
    run = inits.run_one(label, 0, examples[:8], examples[8:], cfg)
    # default: B = 0; pissa / olora: residual base + B A = W. Either way the untrained adapter
    # leaves the function unchanged.
    assert run["eval_loss_start"] == pytest.approx(_transformers_loss(llama_dir, examples[8:]),
                                                   rel=1e-4)
    assert len(run["train_loss"]) == 3 and all(math.isfinite(x) for x in run["train_loss"])
    assert run["eval_loss_end"] != run["eval_loss_start"] and run["trainable"] > 0


def test_loftq_starts_closer_to_the_float_base_than_qlora(llama_dir):
    examples = _examples(llama_dir, 12)
    cfg = {"base": str(llama_dir), "r": 8, "targets": ["q_proj", "k_proj", "v_proj", "o_proj"],
           "steps": 1, "batch_size": 4, "lr": 1e-3, "warmup": 1,
           "pad_id": load_tokenizer(llama_dir).eos_token_id}
    # LoftQ adapts only the attention projections; the rest is NF4 in both, as QLoRA has it.
    loftq = inits.build_model(cfg["base"], "loftq", 8, cfg["targets"])  # alpha = r: exact fold
    qlora = inits.build_model(cfg["base"], "qlora", 8, cfg["targets"])
    from transformers import AutoModelForCausalLM
    ref = AutoModelForCausalLM.from_pretrained(llama_dir, torch_dtype=torch.float32).eval()
    ids = torch.tensor([examples[0].input_ids])
    with torch.no_grad():
        want = ref(ids).logits
        err = {name: (m.eval()(ids) - want).abs().mean().item()
               for name, m in (("loftq", loftq), ("qlora", qlora))}
    assert err["loftq"] < err["qlora"], err


def _run(label, seed, curve):
    return {"init": label, "seed": seed, "train_loss": curve, "eval_loss_start": 5.0,
            "eval_loss_end": curve[-1], "train_s": 1.0}


def test_summary_verdicts_need_non_overlapping_seed_ranges():
    runs = [_run("default", s, [3.0 + 0.1 * s, 2.0]) for s in range(3)]
    runs += [_run("pissa", s, [1.0, 1.0 + 0.1 * s]) for s in range(3)]     # clearly lower
    runs += [_run("olora", s, [2.4 + 0.2 * s, 2.4]) for s in range(3)]     # overlaps default
    runs += [_run("qlora", s, [2.0, 2.0]) for s in range(3)]
    runs += [_run("loftq", s, [3.0, 3.0]) for s in range(3)]               # higher
    s = inits.summarize(runs)
    assert s["default"]["verdict"] == "reference" and s["qlora"]["verdict"] == "reference"
    assert s["pissa"]["verdict"] == "faster" and s["pissa"]["vs"] == "default"
    assert s["olora"]["verdict"] == "within seed spread"
    assert s["loftq"]["verdict"] == "slower" and s["loftq"]["vs"] == "qlora"
    assert s["default"]["auc"]["min"] == pytest.approx(2.5)
    assert s["default"]["auc"]["max"] == pytest.approx(2.6)


def test_steps_to_reach_uses_a_trailing_mean():
    # one lucky batch (step 2) does not count; the trailing mean drops below 1 at step 8
    assert inits.steps_to_reach([3.0, 0.5, 3.0, 0.5, 0.5, 0.5, 0.5, 0.5], target=1.0) == 8
    assert inits.steps_to_reach([0.5], target=1.0) == 1
    assert inits.steps_to_reach([2.0, 2.0], target=1.0) is None


def test_paper_section_replaces_only_its_block(tmp_path):
    runs = [_run(lb, s, [3.0, 2.0]) for lb in ("default", "pissa") for s in range(2)]
    data = {"command": "python -m lorafleet.bench.inits", "wall_s": 120.0, "runs": runs,
            "summary": inits.summarize(runs),
            "config": {"task": "json", "r": 8, "targets": ["q_proj"], "steps": 2,
                       "batch_size": 8, "lr": 0.01, "warmup": 1, "seed_list": [0, 1],
                       "n_test": 4}}
    paper = tmp_path / "paper.md"
    paper.write_text("intro\n")
    inits.write_paper_section(paper, inits.section_lines([(data, "figures/x.png")]))
    inits.write_paper_section(paper, inits.section_lines([(data, "figures/x.png")]))
    text = paper.read_text()
    assert text.startswith("intro\n") and text.count(inits.PAPER_BEGIN) == 1
    assert "| pissa | 2 | 2.500 (2.500-2.500) | 3.0 (3-3) |" in text  # never < 1: steps + 1
    assert "](figures/x.png)" in text

    # --from-json: two studies -> one section with two tables and their redrawn figures
    (tmp_path / "a.json").write_text(json.dumps(data))
    (tmp_path / "b.json").write_text(json.dumps({**data, "config": {**data["config"],
                                                                   "lr": 0.003}}))
    parser = argparse.ArgumentParser()
    inits.add_arguments(parser)
    assert inits.run(parser.parse_args(["--from-json", str(tmp_path / "a.json"),
                                        str(tmp_path / "b.json"), "--paper", str(paper)])) == 0
    text = paper.read_text()
    assert text.count(inits.PAPER_BEGIN) == 1 and text.count("| pissa | 2 |") == 2
    assert "AdamW lr 0.01" in text and "AdamW lr 0.003" in text
    for name in ("a", "b"):
        assert f"](figures/{name}_loss.png)" in text
        assert (tmp_path / "figures" / f"{name}_loss.png").stat().st_size > 1000


def _args(tmp_path, llama_dir, **kw):
    parser = argparse.ArgumentParser()
    inits.add_arguments(parser)
    args = parser.parse_args(["--quick", "--base", str(llama_dir), "--task", "join",
                              "--json", str(tmp_path / "inits.json"),
                              "--figure", str(tmp_path / "figures" / "inits.png"),
                              "--paper", str(tmp_path / "paper.md")])
    for k, v in kw.items():
        setattr(args, k, v)
    return args


def test_unknown_init_names_the_flag(tmp_path, llama_dir):
    with pytest.raises(ConfigError, match="--inits.*bogus"):
        inits.run(_args(tmp_path, llama_dir, inits="default,bogus"))


@pytest.mark.slow
def test_quick_study_end_to_end(tmp_path, llama_dir):
    assert inits.run(_args(tmp_path, llama_dir)) == 0
    data = json.loads((tmp_path / "inits.json").read_text())
    assert {r["init"] for r in data["runs"]} == set(inits.INITS)
    assert all(len(r["train_loss"]) == 4 for r in data["runs"])
    assert (tmp_path / "figures" / "inits.png").stat().st_size > 1000
    assert "](figures/inits.png)" in (tmp_path / "paper.md").read_text()
