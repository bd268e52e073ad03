"""The demo's steps on a tiny random model (the pipeline, not the quality)."""
import pytest

from lorafleet.demo import pipeline as pl
from lorafleet.errors import ConfigError


def test_embedded_base_model_is_a_hf_folder():
    base = pl.default_base_model()
    for name in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"):
        assert (base / name).is_file(), name
    assert (base / "model.safetensors").stat().st_size < 30 * 2**20


@pytest.mark.slow
def test_embedded_base_model_speaks_english():
    """Greedy text from the shipped model is made of real English words."""
    import re

    from lorafleet.models import load_model, load_tokenizer
    from lorafleet.models.generate import generate

    base = pl.default_base_model()
    model, tok = load_model(base), load_tokenizer(base)
    text = generate(model, tok.encode("The king"), max_new_tokens=40, tokenizer=tok).text
    words = re.findall(r"[a-z]+", text.lower())
    common = {"the", "and", "of", "to", "i", "you", "my", "a", "is", "that", "in", "not", "me",
              "it", "with", "be", "your", "his", "this", "he", "what", "but", "for", "have",
              "thou", "thee", "thy", "so", "will", "lord", "as", "shall", "by", "all", "are"}
    assert len(words) >= 10 and sum(w in common for w in words) >= 4, text


def test_config_validation(tmp_path):
    with pytest.raises(ConfigError, match="no config.json"):
        pl.DemoConfig(base=tmp_path)
    with pytest.raises(ConfigError, match="merge_task"):
        pl.DemoConfig(tasks=("e2e",), merge_task="json")


def test_prepare_data_writes_jsonl(tmp_path, llama_dir):
    cfg = pl.DemoConfig(work=tmp_path, base=llama_dir, n_train=10, n_test=3)
    data = pl.prepare_data(cfg)
    assert set(data) == {"e2e", "json", "upper"}
    for path, tests in data.values():
        assert len(path.read_text().splitlines()) == 10 and len(tests) == 3


@pytest.mark.slow
def test_demo_quick_end_to_end(tmp_path, llama_dir, capsys):
    """Train tiny adapters, serve them over HTTP, query, score, merge: every step runs."""
    from lorafleet.cli import main

    assert main(["demo", "--quick", "--base", str(llama_dir), "--work", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    for step in ("1/5 data", "2/5 training", "3/5 serving", "4/5 requests", "5/5 merge"):
        assert step in out
    assert "merged == unmerged: True" in out
    for task in ("e2e", "json", "upper"):
        assert (tmp_path / "runs" / task / "adapter" / "adapter_model.safetensors").is_file()
