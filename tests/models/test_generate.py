"""Generation against transformers' `generate` (greedy, token for token) and the KV cache
against a full forward."""
import pytest
import torch

from lorafleet.errors import ConfigError
from lorafleet.models import (ForwardBatch, KVCache, SamplingParams, generate, load_model,
                              load_tokenizer)


def hf_greedy(ref, prompt, n):
    out = ref.generate(prompt[None], max_new_tokens=n, do_sample=False)[0, len(prompt):].tolist()
    eos = ref.config.eos_token_id
    return out[:out.index(eos)] if eos in out else out


@pytest.mark.parametrize("name", ["llama_gqa", "llama3_rope_tied", "llama_sharded", "qwen2",
                                  "mistral", "gpt2"])
def test_greedy_matches_transformers(checkpoints, name):
    path, ref = checkpoints(name)
    model = load_model(path)
    for seed in range(2):
        prompt = torch.randint(2, 384, (7,), generator=torch.Generator().manual_seed(seed))
        ours = generate(model, prompt, 24)
        assert ours.token_ids == hf_greedy(ref, prompt, 24)
        assert ours.finish_reason == ("length" if len(ours.token_ids) == 24 else "stop")


def test_kv_cache_decode_equals_full_forward(checkpoints):
    model = load_model(checkpoints("llama_gqa")[0])
    ids = torch.randint(0, 384, (2, 12))
    with torch.no_grad():
        full = model(ids)
        cache = KVCache.for_model(model, batch_size=2, max_len=16)
        steps = []
        for start, end in [(0, 5), (5, 9), (9, 10), (10, 11), (11, 12)]:  # chunked prefill too
            positions = torch.arange(start, end).expand(2, -1)
            cache.begin(positions)
            steps.append(model(ids[:, start:end], ForwardBatch(positions, attention=cache)))
    torch.testing.assert_close(torch.cat(steps, dim=1), full, atol=1e-5, rtol=0)
    with pytest.raises(ConfigError, match="max_len"):
        cache.begin(torch.tensor([[16]]))


def test_sampling_is_seeded_and_respects_limits(checkpoints):
    path, _ = checkpoints("llama_gqa")
    model = load_model(path)
    prompt = [5, 6, 7]
    cfg = SamplingParams(temperature=1.5, top_p=0.9, top_k=50, seed=3, max_tokens=16,
                         ignore_eos=True)
    a, b = generate(model, prompt, sampling=cfg), generate(model, prompt, sampling=cfg)
    assert a.token_ids == b.token_ids and len(a.token_ids) == 16
    other = generate(model, prompt, sampling=SamplingParams(**{**cfg.__dict__, "seed": 4}))
    assert other.token_ids != a.token_ids
    assert generate(model, prompt, 16).token_ids != a.token_ids  # greedy differs


def test_stop_strings_and_eos(checkpoints):
    path, _ = checkpoints("llama_gqa")
    model, tok = load_model(path), load_tokenizer(path)
    prompt = tok.encode("the quick brown")
    full = generate(model, prompt, 12, SamplingParams(ignore_eos=True), tokenizer=tok)
    assert full.text == tok.decode(full.token_ids) and full.finish_reason == "length"
    stop = full.text[len(full.text) // 2:][:3]
    cut = generate(model, prompt, 12, SamplingParams(stop=[stop], ignore_eos=True), tokenizer=tok)
    assert cut.finish_reason == "stop" and cut.text == full.text[:full.text.find(stop)]
    first = full.token_ids[2]
    ended = generate(model, prompt, 12, SamplingParams(eos_token_ids=[first]))
    assert ended.token_ids == full.token_ids[:full.token_ids.index(first)]
    assert ended.finish_reason == "stop"


def test_bad_generation_arguments(checkpoints):
    model = load_model(checkpoints("llama_gqa")[0])
    with pytest.raises(ConfigError, match="top_p"):
        SamplingParams(top_p=0)
    with pytest.raises(ConfigError, match="temperature"):
        SamplingParams(temperature=-1)
    with pytest.raises(ConfigError, match="tokenizer"):
        generate(model, [1, 2], 4, SamplingParams(stop=["x"]))
    with pytest.raises(ConfigError, match="empty"):
        generate(model, [], 4)
    gpt2 = load_model(checkpoints("gpt2")[0])
    with pytest.raises(ConfigError, match="positions"):
        generate(gpt2, [1] * 100, 100)
