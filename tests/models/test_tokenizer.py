"""Our tokenizer against transformers' PreTrainedTokenizerFast on the same folder."""
import json

import pytest
from transformers import AutoTokenizer

from lorafleet.errors import ConfigError, ModelLoadError
from lorafleet.models import load_tokenizer

MESSAGES = [{"role": "system", "content": "be brief"},
            {"role": "user", "content": "the quick brown fox"},
            {"role": "assistant", "content": "jumps over"},
            {"role": "user", "content": "{\"name\": \"alice\"} é"}]


def test_encode_decode_and_special_tokens_match(llama_dir):
    ours, theirs = load_tokenizer(llama_dir), AutoTokenizer.from_pretrained(llama_dir)
    for text in ["the quick brown fox", "to be or not to be , é <s> x", ""]:
        assert ours.encode(text) == theirs.encode(text)
        ids = ours.encode(text)
        assert ours.decode(ids) == theirs.decode(ids, skip_special_tokens=True)
    assert (ours.bos_token_id, ours.eos_token_id) == (theirs.bos_token_id, theirs.eos_token_id)
    assert ours.decode([0, 5], skip_special_tokens=False) == theirs.decode([0, 5])


@pytest.mark.parametrize("add_generation_prompt", [True, False])
def test_chat_template_matches(llama_dir, add_generation_prompt):
    ours, theirs = load_tokenizer(llama_dir), AutoTokenizer.from_pretrained(llama_dir)
    expected = theirs.apply_chat_template(MESSAGES, tokenize=False,
                                          add_generation_prompt=add_generation_prompt)
    assert ours.apply_chat_template(MESSAGES, add_generation_prompt) == expected
    ids = ours.apply_chat_template(MESSAGES, add_generation_prompt, tokenize=True)
    assert ids == theirs.encode(expected, add_special_tokens=False)


def test_template_features_like_transformers(tmp_path, llama_dir):
    """trim_blocks / lstrip_blocks, bos_token variable, raise_exception, tojson."""
    template = ("{{ bos_token }}\n  {% for m in messages %}\n"
                "    {% if m['role'] == 'tool' %}{{ raise_exception('no tools') }}{% endif %}\n"
                "{{ m | tojson }}\n  {% endfor %}")
    for name in ("tokenizer.json",):
        (tmp_path / name).write_bytes((llama_dir / name).read_bytes())
    config = json.loads((llama_dir / "tokenizer_config.json").read_text())
    config.update(chat_template=template, bos_token={"__type": "AddedToken", "content": "<s>", "special": True})
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [1, 3]}))
    ours, theirs = load_tokenizer(tmp_path), AutoTokenizer.from_pretrained(tmp_path)
    assert ours.apply_chat_template(MESSAGES) == theirs.apply_chat_template(
        MESSAGES, tokenize=False, add_generation_prompt=True)
    assert ours.eos_token_ids == [1, 3]
    import jinja2
    with pytest.raises(jinja2.exceptions.TemplateError, match="no tools"):
        ours.apply_chat_template([{"role": "tool", "content": ""}])


def test_bad_tokenizer_folders(tmp_path, llama_dir):
    with pytest.raises(ModelLoadError, match="tokenizer.json"):
        load_tokenizer(tmp_path)
    (tmp_path / "tokenizer.json").write_text("{not json")
    with pytest.raises(ModelLoadError, match="tokenizer.json"):
        load_tokenizer(tmp_path)
    (tmp_path / "tokenizer.json").write_bytes((llama_dir / "tokenizer.json").read_bytes())
    with pytest.raises(ConfigError, match="chat_template"):
        load_tokenizer(tmp_path).apply_chat_template(MESSAGES)
