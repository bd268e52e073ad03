import pytest
import torch

from lorafleet.errors import ConfigError, TargetError
from lorafleet.models import load_model
from lorafleet.train import TrainConfig
from lorafleet.train.methods import MethodConfig, apply_method, resolve_targets

from .conftest import assert_lowers_loss_and_reloads


# (method, lr): large learning rates so a few steps on a random model visibly lower the loss.
# lora/qlora import lorafleet.lora and lorafleet.quant: a missing stage fails, never skips.
METHOD_LR = [("lora", 1e-2), ("qlora", 1e-2), ("full", 3e-3), ("adapter", 1e-2),
             ("prefix", 3e-1), ("prompt", 3e-2), ("bitfit", 1e-1)]


@pytest.mark.parametrize("method, lr", METHOD_LR)
def test_each_method_lowers_loss_and_its_artifact_loads(tmp_path, train_llama_dir, toy_data,
                                                        method, lr):
    llama_dir = train_llama_dir
    cfg = TrainConfig(model=str(llama_dir), data=str(toy_data), out=str(tmp_path / "run"),
                      method=MethodConfig(method, targets="all-linear"), steps=24, lr=lr,
                      batch_size=4, warmup=2)
    # The loss falls, and the artifact rebuilds the same model on a fresh base.
    assert_lowers_loss_and_reloads(cfg, llama_dir)


@pytest.mark.parametrize("method", ["adapter", "bitfit"])
def test_zero_initialized_methods_start_at_the_base_model(llama_dir, method):
    base = load_model(llama_dir)
    ids = torch.randint(2, 300, (2, 10))
    with torch.no_grad():
        before = base(ids)
        after = apply_method(base, MethodConfig(method))(ids)
    torch.testing.assert_close(after, before)


def test_trainable_parameter_counts(llama_dir):
    cfg = load_model(llama_dir).config
    hidden, kv = cfg.hidden_size, cfg.num_key_value_heads * cfg.head_dim
    n_layers = cfg.num_hidden_layers

    def trainable(method, **kw):
        model = apply_method(load_model(llama_dir), MethodConfig(method, **kw))
        return sum(p.numel() for p in model.parameters() if p.requires_grad)

    assert trainable("prompt", virtual_tokens=5) == 5 * hidden
    assert trainable("prefix", virtual_tokens=5) == n_layers * 2 * 5 * kv
    b = 16
    assert trainable("adapter", bottleneck=b) == n_layers * 2 * (2 * hidden * b + b + hidden)
    # bitfit: a zero bias on every linear layer but lm_head (Llama has none of its own).
    q, inner = cfg.num_attention_heads * cfg.head_dim, cfg.intermediate_size
    assert trainable("bitfit") == n_layers * (q + 2 * kv + hidden + 2 * inner + hidden)
    full = load_model(llama_dir)
    assert trainable("full") == sum(p.numel() for p in full.parameters())


def test_methods_on_gpt2_fused_attention(gpt2_dir):
    model = load_model(gpt2_dir)
    assert resolve_targets(model, "q,v") == ["attn.c_attn"]
    assert resolve_targets(model, "all-linear") == ["c_attn", "c_fc", "c_proj"]
    n_embd = model.config.hidden_size
    prefixed = apply_method(model, MethodConfig("prefix", virtual_tokens=3))
    shapes = [tuple(p.shape) for p in prefixed.parameters() if p.requires_grad]
    assert shapes == [(3, 2 * n_embd)] * model.config.num_hidden_layers  # k and v columns only
    assert prefixed(torch.randint(2, 300, (1, 7))).shape[:2] == (1, 7)


def test_bad_method_and_targets(llama_dir):
    with pytest.raises(ConfigError, match="method must be one of"):
        MethodConfig("dora")
    with pytest.raises(TargetError, match="matches no module"):
        resolve_targets(load_model(llama_dir), "q,nonexistent")
