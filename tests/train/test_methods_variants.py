"""The baselines' fairer variants (issue 18 item 3): prefix tuning through Li & Liang's MLP
reparameterization (checked against PEFT's PrefixTuningConfig(prefix_projection=True) and against
transformers run with the prefixes as its KV cache), and Lin et al.'s adapter beside Houlsby's."""
import argparse

import pytest
import torch
from safetensors.torch import load_file

from lorafleet.errors import ConfigError
from lorafleet.models import load_model
from lorafleet.train import TrainConfig, load_trained, save_trained
from lorafleet.train.methods import (TRAINABLE_FILE, LinAdapter, MethodConfig, PrefixEncoder,
                                     ProjectedTokenOutput, apply_method)

P, ENC = 5, 32


def hf_llama(seed=0, **overrides):
    """A tiny transformers Llama with as many KV heads as query heads (PEFT's prefix encoder
    sizes every prefix by hidden_size, which is the KV width only then)."""
    from hf_fixtures import _config
    torch.manual_seed(seed)
    config, cls = _config("llama", 300, num_key_value_heads=4, **overrides)
    return cls(config).eval()


def trainable_count(model):
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def projected(model, **kw):
    return apply_method(model, MethodConfig("prefix", prefix_projection=True, virtual_tokens=P,
                                            prefix_hidden=ENC, **kw))


def test_prefix_projection_matches_peft_parameter_count_and_shapes():
    from peft import PrefixTuningConfig, get_peft_model
    ours = projected(hf_llama())
    peft_model = get_peft_model(hf_llama(), PrefixTuningConfig(
        task_type="CAUSAL_LM", num_virtual_tokens=P, prefix_projection=True,
        encoder_hidden_size=ENC))
    peft_trainable = peft_model.get_nb_trainable_parameters()[0]
    assert trainable_count(ours) == peft_trainable
    shapes = lambda m: sorted(tuple(p.shape) for p in m.parameters() if p.requires_grad)  # noqa
    assert shapes(ours) == shapes(peft_model)
    cfg = ours.model.config
    hidden, layers = cfg.hidden_size, cfg.num_hidden_layers
    assert peft_trainable == P * hidden + hidden * ENC + ENC + ENC * layers * 2 * hidden \
        + layers * 2 * hidden


def test_prefix_projection_is_the_base_with_those_prefixes_as_kv_cache():
    """Oracle: transformers' own Llama given our projected prefixes as a P-token past (keys
    rotated to positions 0..P-1, as our k_proj overwrite is) gives the same logits."""
    from transformers import DynamicCache
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb
    base, wrapped = hf_llama(), hf_llama()      # same seed: same weights
    cfg = base.config
    heads, head_dim = cfg.num_key_value_heads, cfg.hidden_size // cfg.num_attention_heads
    ids = torch.randint(3, 300, (2, 9))
    with torch.no_grad():
        plain = base(ids).logits
        ours = projected(wrapped)
        logits = ours(ids)
        blocks = [m.learned() for _, m in ours.named_modules()
                  if isinstance(m, ProjectedTokenOutput)]      # k0, v0, k1, v1, ...
        assert len(blocks) == 2 * cfg.num_hidden_layers
        # the blocks tile the MLP's output: Linear -> tanh -> Linear on the P embeddings
        encoder = ours.prefix_encoder
        torch.testing.assert_close(torch.cat(blocks, -1),
                                   encoder.transform(encoder.embedding.weight))
        positions = torch.arange(P)[None]
        cos, sin = base.model.rotary_emb(blocks[0][None], positions)
        cache = DynamicCache()
        for layer in range(cfg.num_hidden_layers):
            k, v = (blocks[2 * layer + i].view(1, P, heads, head_dim).transpose(1, 2)
                    .expand(ids.shape[0], -1, -1, -1) for i in (0, 1))
            k = apply_rotary_pos_emb(k, k, cos, sin)[1]
            cache.update(k.contiguous(), v.contiguous(), layer)
        expected = base(ids, past_key_values=cache,
                        attention_mask=torch.ones(ids.shape[0], P + ids.shape[1])).logits
    torch.testing.assert_close(logits, expected, rtol=1e-4, atol=1e-4)
    assert not torch.allclose(logits, plain, atol=1e-3)   # the prefix does change the output


def test_prefix_projection_trains_only_the_mlp_and_lowers_the_loss(train_llama_dir):
    torch.manual_seed(0)
    model = projected(load_model(train_llama_dir))
    names = sorted(n for n, p in model.named_parameters() if p.requires_grad)
    assert names == ["prefix_encoder.embedding.weight", "prefix_encoder.transform.0.bias",
                     "prefix_encoder.transform.0.weight", "prefix_encoder.transform.2.bias",
                     "prefix_encoder.transform.2.weight"]
    ids = torch.randint(3, 300, (4, 12))
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    losses = []
    for _ in range(20):
        logits = model(ids[:, :-1])
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]),
                                                 ids[:, 1:].reshape(-1))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert sum(losses[-3:]) / 3 < 0.8 * losses[0], losses


def test_prefix_projection_round_trip_keeps_only_the_prefixes(tmp_path, llama_dir):
    torch.manual_seed(1)
    cfg = MethodConfig("prefix", prefix_projection=True, virtual_tokens=P, prefix_hidden=ENC)
    state = {}
    model = apply_method(load_model(llama_dir), cfg, state)
    ids = torch.randint(3, 300, (2, 10))
    save_trained(model, cfg, state, tmp_path / "art")
    saved = load_file(str(tmp_path / "art" / TRAINABLE_FILE))
    config = load_model(llama_dir).config
    kv = config.num_key_value_heads * config.head_dim
    assert len(saved) == 2 * config.num_hidden_layers
    assert all(n.endswith(".virtual") and t.shape == (P, kv) for n, t in saved.items())
    with torch.no_grad():
        expected = model(ids)
        reloaded_model = load_trained(load_model(llama_dir), tmp_path / "art")
        reloaded = reloaded_model(ids)
    assert not any(isinstance(m, PrefixEncoder) for m in reloaded_model.modules())
    torch.testing.assert_close(reloaded, expected, rtol=0, atol=0)


def test_lin_adapter_places_one_per_layer_and_starts_at_the_base(llama_dir):
    base = load_model(llama_dir)
    ids = torch.randint(3, 300, (2, 10))
    with torch.no_grad():
        before = base(ids)
        model = apply_method(base, MethodConfig("adapter", adapter_variant="lin", bottleneck=8))
        after = model(ids)
    torch.testing.assert_close(after, before, rtol=0, atol=0)
    wrapped = [n for n, m in model.named_modules() if isinstance(m, LinAdapter)]
    config = model.config
    assert wrapped == [f"model.layers.{i}.mlp.down_proj" for i in range(config.num_hidden_layers)]
    hidden, b = config.hidden_size, 8
    # LayerNorm (weight + bias) + down (weight + bias) + up (weight + bias), once per layer
    assert trainable_count(model) == config.num_hidden_layers * (
        2 * hidden + hidden * b + b + b * hidden + hidden)


def test_lin_adapter_computes_its_formula_and_round_trips(tmp_path, llama_dir):
    """Reference: the base model with a hook adding up(relu(down(LN(y)))) to each FFN output."""
    torch.manual_seed(2)
    cfg = MethodConfig("adapter", adapter_variant="lin", bottleneck=8)
    state = {}
    model = apply_method(load_model(llama_dir), cfg, state)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.3)
    adapters = {n: m for n, m in model.named_modules() if isinstance(m, LinAdapter)}
    reference = load_model(llama_dir)
    for name, a in adapters.items():
        def hook(module, inputs, y, a=a):
            normed = torch.nn.functional.layer_norm(y, y.shape[-1:], a.norm.weight, a.norm.bias,
                                                    a.norm.eps)
            hid = torch.relu(normed @ a.down.weight.T + a.down.bias)
            return y + hid @ a.up.weight.T + a.up.bias
        reference.get_submodule(name).register_forward_hook(hook)
    ids = torch.randint(3, 300, (2, 10))
    save_trained(model, cfg, state, tmp_path / "art")
    with torch.no_grad():
        out = model(ids)
        torch.testing.assert_close(out, reference(ids), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(load_trained(load_model(llama_dir), tmp_path / "art")(ids),
                                   out, rtol=0, atol=0)


def test_houlsby_is_still_the_default(llama_dir):
    model = apply_method(load_model(llama_dir), MethodConfig("adapter"))
    assert not any(isinstance(m, LinAdapter) for m in model.modules())
    n_layers = model.config.num_hidden_layers
    assert sum(n.endswith(("o_proj", "down_proj")) and hasattr(m, "up")
               for n, m in model.named_modules()) == 2 * n_layers


def test_option_names_through_from_flat_and_the_cli(tmp_path):
    common = dict(model="m", data="d.jsonl", out=str(tmp_path / "o"))
    prefix = TrainConfig.from_flat(**common, method="prefix", prefix_projection=True,
                                   virtual_tokens=4)
    assert (prefix.method.method, prefix.method.prefix_projection,
            prefix.method.virtual_tokens, prefix.method.prefix_hidden) == ("prefix", True, 4, 512)
    lin = TrainConfig.from_flat(**common, method="adapter", adapter_variant="lin")
    assert lin.method.adapter_variant == "lin"
    assert TrainConfig.from_flat(**common, method="adapter").method.adapter_variant == "houlsby"
    with pytest.raises(ConfigError, match="adapter_variant"):
        TrainConfig.from_flat(**common, method="adapter", adapter_variant="pfeiffer")
    with pytest.raises(ConfigError, match="prefix_hidden"):
        MethodConfig("prefix", prefix_projection=True, prefix_hidden=0)

    from lorafleet.cli.train import add_parser, config_from_args
    parser = argparse.ArgumentParser()
    add_parser(parser.add_subparsers())
    base = ["train", "--model", "m", "--data", "d.jsonl", "--out", str(tmp_path / "o")]
    args = parser.parse_args(base + ["--method", "prefix", "--prefix-projection",
                                     "--prefix-hidden", "64"])
    method = config_from_args(args).method
    assert (method.prefix_projection, method.prefix_hidden) == (True, 64)
    args = parser.parse_args(base + ["--method", "adapter", "--adapter-variant", "lin"])
    assert config_from_args(args).method.adapter_variant == "lin"


def test_prompt_init_draws_real_vocabulary_rows_not_special_tokens(llama_dir):
    base = load_model(llama_dir)
    table = base.get_submodule("model.embed_tokens").weight.detach().clone()
    special = {base.config.bos_token_id, base.config.eos_token_id}
    model = apply_method(base, MethodConfig("prompt", virtual_tokens=300))
    init = next(p for p in model.parameters() if p.requires_grad).detach()
    # each learned row is some vocabulary row, and never a special token's
    matches = (init[:, None, :] == table[None]).all(-1)        # [P, vocab]
    assert matches.any(-1).all()
    assert not matches[:, sorted(special)].any()


@pytest.mark.parametrize("overrides, lr", [
    ({"method": "prefix", "prefix_projection": True, "virtual_tokens": 4}, 1e-2),
    ({"method": "adapter", "adapter_variant": "lin"}, 1e-2)])
def test_trainer_runs_the_variants_from_flat_keys(tmp_path, train_llama_dir, toy_data,
                                                  overrides, lr):
    """The keys the bench methods study passes, through the real trainer and its artifact."""
    from .conftest import assert_lowers_loss_and_reloads
    cfg = TrainConfig.from_flat(model=str(train_llama_dir), data=str(toy_data),
                                out=str(tmp_path / "run"), steps=24, lr=lr, batch_size=4,
                                warmup=2, **overrides)
    assert_lowers_loss_and_reloads(cfg, train_llama_dir)


def test_prefix_projection_on_gpt2_fused_attention_matches_peft():
    """GPT-2's c_attn holds q|k|v: the MLP feeds only its k and v columns, 2 * n_embd per layer."""
    from peft import PrefixTuningConfig, get_peft_model

    from hf_fixtures import _config

    def gpt2():
        torch.manual_seed(0)
        config, cls = _config("gpt2", 300)
        return cls(config).eval()
    ours = projected(gpt2())
    peft_model = get_peft_model(gpt2(), PrefixTuningConfig(
        task_type="CAUSAL_LM", num_virtual_tokens=P, prefix_projection=True,
        encoder_hidden_size=ENC))
    assert trainable_count(ours) == peft_model.get_nb_trainable_parameters()[0]
    ids = torch.randint(3, 300, (2, 7))
    with torch.no_grad():
        assert ours(ids).shape == (2, 7, 300)
