"""Visible runs: `lorafleet eval` against transformers / PEFT, checkpoints that hold servable PEFT
folders, `lorafleet plot`, `lorafleet env`, --report-to."""
import json

import pytest
import torch

from lorafleet.cli import main
from lorafleet.errors import ConfigError
from lorafleet.train import DataConfig, TrainConfig, load_dataset, train
from lorafleet.train.evaluate import evaluate_adapters
from lorafleet.train.trainer import count_targets

from .conftest import get_tokenizer


@pytest.fixture(scope="module")
def run(tmp_path_factory, llama_dir):
    from .conftest import toy_records, write_jsonl
    tmp = tmp_path_factory.mktemp("visible")
    data = write_jsonl(tmp / "toy.jsonl", toy_records())
    result = train(TrainConfig.from_flat(model=str(llama_dir), data=str(data), out=str(tmp / "run"),
                                         steps=4, lr=1e-2, save_every=2, keep_checkpoints=3,
                                         val_file=str(data), eval_every=2, targets="q,v,o"))
    return result, data


def test_eval_matches_the_trainer_and_transformers(run, llama_dir):
    transformers = pytest.importorskip("transformers")
    result, data = run
    final = str(result.out / "adapter")
    step4 = str(result.out / "checkpoints" / "step-00000004" / "adapter")
    step2 = str(result.out / "checkpoints" / "step-00000002" / "adapter")
    cfg = DataConfig(str(data), max_len=512)
    base, adapted, at4, at2 = evaluate_adapters(str(llama_dir), cfg, ["base", final, step4, step2])
    # the adapter: what the trainer measured on the same file at the end
    assert adapted.loss == pytest.approx(result.eval_loss, rel=1e-5)
    assert at4.loss == pytest.approx(adapted.loss, rel=1e-6)   # the same weights
    assert at2.loss != pytest.approx(at4.loss, rel=1e-3)       # an earlier, different adapter
    # the base: transformers' own cross-entropy over the same label tokens
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(llama_dir), dtype=torch.float32)
    examples = load_dataset(cfg, get_tokenizer(llama_dir))[0]
    total = 0.0
    with torch.no_grad():
        for e in examples:
            logits = hf(torch.tensor([e.input_ids])).logits[0, :-1]
            total += torch.nn.functional.cross_entropy(logits, torch.tensor(e.labels[1:]),
                                                       ignore_index=-100, reduction="sum").item()
    assert base.loss == pytest.approx(total / count_targets(examples), rel=1e-4)
    assert base.tokens == count_targets(examples) and base.loss > adapted.loss


def test_eval_task_metrics_agree_with_peft_greedy_generation(run, llama_dir):
    transformers = pytest.importorskip("transformers")
    peft = pytest.importorskip("peft")
    result, data = run
    # a checkpoint's adapter folder is a PEFT folder: PEFT loads it as is
    adapter = result.out / "checkpoints" / "step-00000004" / "adapter"
    (r,) = evaluate_adapters(str(llama_dir), DataConfig(str(data)), [str(adapter)],
                             generate=True, max_new_tokens=8)
    tok = get_tokenizer(llama_dir)
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(llama_dir), dtype=torch.float32)
    model = peft.PeftModel.from_pretrained(hf, str(adapter)).eval()
    records = [json.loads(line) for line in data.read_text().splitlines()]
    exact, predictions = 0, []
    for rec in records:
        ids = torch.tensor([tok.encode(rec["prompt"])])
        out = model.generate(input_ids=ids, max_new_tokens=8, do_sample=False,
                             eos_token_id=tok.eos_token_id, pad_token_id=tok.eos_token_id)
        text = tok.decode(out[0, ids.shape[1]:].tolist())
        exact += text.strip() == rec["completion"].strip()
        predictions.append(text.strip())
    import sacrebleu
    chrf = sacrebleu.corpus_chrf(predictions, [[rec["completion"].strip() for rec in records]])
    assert r.exact_match == pytest.approx(exact / len(records))
    assert r.chrf == pytest.approx(chrf.score) and r.chrf > 0   # the same completions


def test_eval_cli_table_and_json(run, llama_dir, capsys):
    result, data = run
    assert main(["eval", "--model", str(llama_dir), "--data", str(data), "--json", "base",
                 str(result.out / "adapter")]) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [r["adapter"] for r in rows] == ["base", str(result.out / "adapter")]
    assert rows[1]["loss"] == pytest.approx(result.eval_loss, rel=1e-5)
    assert main(["eval", "--model", str(llama_dir), "--data", str(data), "nowhere"]) == 1
    assert "not an adapter folder" in capsys.readouterr().err


def test_plot_writes_a_png_of_the_run(run, tmp_path):
    result, _ = run
    out = tmp_path / "curves.png"
    assert main(["plot", str(result.out), "--out", str(out)]) == 0
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and out.stat().st_size > 10_000
    assert main(["plot", str(tmp_path)]) == 1          # no log.jsonl: a clear error


@pytest.fixture
def fresh_kernels():
    """env rebuilds the kernels' cached loaders; rebuild them again afterwards so the rest of
    the session does not keep a fallback forced here."""
    import importlib

    from lorafleet.cli.env import KERNELS
    loaders = [getattr(importlib.import_module(m), f) for _, m, f in KERNELS]
    yield
    for load in loaders:
        load.cache_clear()


def test_env_reports_kernels_and_fallback_reasons(monkeypatch, capsys, caplog, fresh_kernels):
    import logging
    monkeypatch.setenv("LORAFLEET_NF4_KERNEL", "0")
    monkeypatch.setenv("CC", "/nonexistent/cc")      # the other kernels cannot be built
    monkeypatch.setenv("XDG_CACHE_HOME", "/nonexistent-cache")   # nor found already built
    with caplog.at_level(logging.WARNING, logger="lorafleet"):
        assert main(["env"]) == 0
    out = capsys.readouterr().out
    assert "torch" in out
    assert "NF4 matmul kernel" in out and "switched off (LORAFLEET_NF4_KERNEL=0)" in out
    assert "slow SGMV LoRA kernel" in out and "/nonexistent/cc" in out
    monkeypatch.delenv("CC")
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.delenv("LORAFLEET_NF4_KERNEL")
    assert main(["env"]) == 0
    if "C compiler" not in caplog.text:    # where a compiler exists, the kernels build
        assert "ok   SGMV LoRA kernel" in capsys.readouterr().out


def test_report_to_is_a_choice(tmp_path, llama_dir, toy_data):
    cfg = dict(model=str(llama_dir), data=str(toy_data), steps=1)
    train(TrainConfig.from_flat(out=str(tmp_path / "none"), **cfg))
    assert not (tmp_path / "none" / "tensorboard").exists()      # default: nothing but log.jsonl
    try:
        import torch.utils.tensorboard  # noqa: F401
    except ImportError:
        with pytest.raises(ConfigError, match=r"lorafleet\[track\]"):
            train(TrainConfig.from_flat(out=str(tmp_path / "tb"), report_to="tensorboard", **cfg))
    else:
        train(TrainConfig.from_flat(out=str(tmp_path / "tb"), report_to="tensorboard", **cfg))
        assert any((tmp_path / "tb" / "tensorboard").iterdir())
