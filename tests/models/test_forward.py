"""Our models against transformers (the oracle): same checkpoint, same logits."""
import json

import pytest
import torch

from lorafleet.models import Conv1D, ForwardBatch, ModelConfig, linear_layer_names, load_model

NAMES = ["llama_gqa", "llama3_rope_tied", "llama_sharded", "mistral", "qwen2", "gpt2"]


@pytest.mark.parametrize("name", NAMES)
def test_logits_match_transformers(checkpoints, name):
    path, ref = checkpoints(name)
    model = load_model(path)
    ids = torch.randint(0, ref.config.vocab_size, (2, 48), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = ref(ids).logits
        got = model(ids)
    assert got.shape == expected.shape
    assert expected.abs().max() > 0.1  # the oracle says something
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=0)


def test_sharded_checkpoint_really_is_sharded(checkpoints):
    path, _ = checkpoints("llama_sharded")
    index = json.loads((path / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1


def test_llama3_rope_scaling_is_read_and_matters(checkpoints):
    path, ref = checkpoints("llama3_rope_tied")
    config = ModelConfig.from_hf(path)
    assert config.rope_scaling["rope_type"] == "llama3" and config.rope_theta == 500000.0
    model = load_model(path)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    ids = torch.arange(64)[None] % ref.config.vocab_size
    model.model.rotary_emb.scaling = None  # without the scaling the oracle disagrees
    model.model.rotary_emb._inv_freq.clear()
    with torch.no_grad():
        assert (model(ids) - ref(ids).logits).abs().max() > 1e-3


def test_v4_config_keys(tmp_path):
    raw = {"architectures": ["LlamaForCausalLM"], "vocab_size": 10, "hidden_size": 8,
           "intermediate_size": 16, "num_hidden_layers": 1, "num_attention_heads": 2,
           "rope_theta": 5e5, "rope_scaling": {"type": "linear", "factor": 2.0}}
    (tmp_path / "config.json").write_text(json.dumps(raw))
    config = ModelConfig.from_hf(tmp_path)
    assert config.rope_theta == 5e5 and config.rope_scaling["rope_type"] == "linear"
    assert config.num_key_value_heads == 2 and config.head_dim == 4


@pytest.mark.parametrize("dtype", ["bf16", "fp16"])
def test_half_precision_close_to_fp32(checkpoints, dtype):
    path, _ = checkpoints("llama_gqa")
    ids = torch.randint(0, 384, (1, 16))
    with torch.no_grad():
        full = load_model(path)(ids)
        half = load_model(path, dtype=dtype)(ids)
    assert half.dtype == {"bf16": torch.bfloat16, "fp16": torch.float16}[dtype]
    torch.testing.assert_close(half.float(), full, atol=0.1, rtol=0.05)


def test_module_names_equal_transformers(checkpoints):
    for name in ("llama_gqa", "qwen2", "gpt2"):
        path, ref = checkpoints(name)
        model = load_model(path)
        ours = {n for n, m in model.named_modules() if isinstance(m, (torch.nn.Linear, Conv1D))}
        theirs = {n for n, m in ref.named_modules()
                  if isinstance(m, torch.nn.Linear) or type(m).__name__ == "Conv1D"}
        assert ours == theirs
        assert set(linear_layer_names(model)) == theirs - {"lm_head"}
    gpt2 = load_model(checkpoints("gpt2")[0])
    assert gpt2.transformer.h[0].attn.c_attn.weight.shape == (64, 192)  # Conv1D: [in, out]


class SegmentedCausal:
    """A test backend: several sequences flattened into one row (B=1), each attending causally
    within its own segment (what the serving engine's paged backend does)."""

    def __init__(self, lengths):
        ends = torch.tensor(lengths).cumsum(0)
        segment = torch.repeat_interleave(torch.arange(len(lengths)), torch.tensor(lengths))
        idx = torch.arange(int(ends[-1]))
        self.mask = (segment[:, None] == segment[None, :]) & (idx[None, :] <= idx[:, None])

    def attend(self, layer_idx, q, k, v, scale):
        n_rep = q.shape[2] // k.shape[2]
        k, v = (t.repeat_interleave(n_rep, dim=2).transpose(1, 2) for t in (k, v))
        y = torch.nn.functional.scaled_dot_product_attention(
            q.transpose(1, 2), k, v, attn_mask=self.mask, scale=scale)
        return y.transpose(1, 2)


@pytest.mark.parametrize("name", ["llama_gqa", "gpt2"])
def test_flattened_sequences_equal_separate_forwards(checkpoints, name):
    model = load_model(checkpoints(name)[0])
    seqs = [torch.randint(0, 384, (n,)) for n in (5, 11, 3)]
    positions = torch.cat([torch.arange(len(s)) for s in seqs])[None]
    batch = ForwardBatch(positions=positions, attention=SegmentedCausal([len(s) for s in seqs]))
    with torch.no_grad():
        flat = model(torch.cat(seqs)[None], batch)[0]
        separate = torch.cat([model(s[None])[0] for s in seqs])
        last = model(torch.cat(seqs)[None], batch, logits_indices=torch.tensor([4, 15, 18]))
    torch.testing.assert_close(flat, separate, atol=1e-5, rtol=0)
    torch.testing.assert_close(last[0], separate[[4, 15, 18]], atol=1e-5, rtol=0)


def test_lora_metadata_reaches_every_projection(checkpoints):
    """`batch.lora` is handed to each projection as its second argument."""
    model = load_model(checkpoints("llama_gqa")[0])
    seen = []

    class Spy(torch.nn.Module):
        def __init__(self, inner, name):
            super().__init__()
            self.inner, self.name = inner, name

        def forward(self, x, lora=None):
            seen.append((self.name, lora))
            return self.inner(x)
    names = linear_layer_names(model, include_lm_head=True)
    for name in names:
        parent, _, child = name.rpartition(".")
        owner = model.get_submodule(parent) if parent else model
        setattr(owner, child, Spy(getattr(owner, child), name))
    ids = torch.randint(0, 384, (1, 4))
    model(ids, ForwardBatch(positions=torch.arange(4)[None], lora="meta"))
    assert sorted(n for n, _ in seen) == sorted(names)
    assert all(lora == "meta" for _, lora in seen)
