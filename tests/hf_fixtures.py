"""Small random-weight Hugging Face checkpoints and a tiny BPE tokenizer, built offline.

Every test that needs a base model builds one here with `transformers` (the oracle) and saves it
to a temporary folder, exactly as a user's checkpoint folder looks.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

TEXT = (
    "the quick brown fox jumps over the lazy dog . to be or not to be , that is the question . "
    "whether tis nobler in the mind to suffer the slings and arrows of outrageous fortune . "
    "name : the eagle , food : french , price : cheap , area : riverside . "
    "{ \"name\" : \"alice\" , \"age\" : 30 } reverse : one two three -> three two one . "
) * 4


def make_tokenizer(path: Path, vocab_size: int = 384) -> None:
    """Train a small byte-level BPE and save tokenizer.json + tokenizer_config.json (with a
    ChatML-style chat template) into `path`."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=["<s>", "</s>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([TEXT], trainer)
    path.mkdir(parents=True, exist_ok=True)
    tok.save(str(path / "tokenizer.json"))
    chat_template = (
        "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
        "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
    (path / "tokenizer_config.json").write_text(json.dumps({
        "bos_token": "<s>", "eos_token": "</s>", "chat_template": chat_template,
        "tokenizer_class": "PreTrainedTokenizerFast"}))


def _config(kind: str, vocab_size: int, **overrides):
    import transformers as tf

    common = dict(vocab_size=vocab_size, bos_token_id=0, eos_token_id=1)
    if kind == "gpt2":
        cfg = dict(n_embd=64, n_layer=2, n_head=4, n_positions=128, **common)
        cfg.update(overrides)
        return tf.GPT2Config(**cfg), tf.GPT2LMHeadModel
    llama_like = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                      tie_word_embeddings=False, **common)
    llama_like.update(overrides)
    if kind == "llama":
        return tf.LlamaConfig(**llama_like), tf.LlamaForCausalLM
    if kind == "mistral":
        return tf.MistralConfig(**llama_like), tf.MistralForCausalLM
    if kind == "qwen2":
        return tf.Qwen2Config(**llama_like), tf.Qwen2ForCausalLM
    raise ValueError(f"unknown kind {kind!r}")


def make_checkpoint(path: Path, kind: str = "llama", seed: int = 0, vocab_size: int = 384,
                    max_shard_size: str | None = None, tokenizer: bool = True, **overrides):
    """Build a random `kind` model ("llama", "mistral", "qwen2", "gpt2") with transformers, save
    it (safetensors; sharded when `max_shard_size` is given) plus a tokenizer to `path`, and
    return the transformers model (fp32, eval mode) as the oracle."""
    torch.manual_seed(seed)
    config, cls = _config(kind, vocab_size, **overrides)
    model = cls(config).eval()
    kwargs = {"max_shard_size": max_shard_size} if max_shard_size else {}
    model.save_pretrained(path, safe_serialization=True, **kwargs)
    if tokenizer:
        make_tokenizer(path, vocab_size=vocab_size)
    return model
