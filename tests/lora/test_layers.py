"""LoraLinear / LoraEmbedding against the plain formula, per-row adapters, merge / unmerge."""
import math

import pytest
import torch
from torch import nn

from lorafleet.errors import AdapterError, ShapeError
from lorafleet.lora.layers import LoraEmbedding, LoraLinear, delta_weight, lora_delta


def _layer(in_f=12, out_f=10, bias=True, seed=0):
    torch.manual_seed(seed)
    layer = LoraLinear(nn.Linear(in_f, out_f, bias=bias))
    layer.add_adapter("a", r=4, alpha=8, scaling=2.0, init=False)
    layer.add_adapter("b", r=2, alpha=2, scaling=1.0, init=False)
    return layer


def test_lora_delta_matches_formula():
    torch.manual_seed(0)
    x, A, B = torch.randn(5, 12), torch.randn(4, 12), torch.randn(10, 4)
    torch.testing.assert_close(lora_delta(x, A, B, 0.5), 0.5 * x @ (B @ A).T)
    torch.testing.assert_close(x @ delta_weight(A, B, 0.5).T, lora_delta(x, A, B, 0.5))


def test_init_like_peft():
    layer = LoraLinear(nn.Linear(16, 8))
    layer.add_adapter("k", r=4, alpha=4, scaling=1.0)
    layer.add_adapter("g", r=4, alpha=4, scaling=1.0, init="gaussian")
    assert torch.count_nonzero(layer.lora_B["k"].weight) == 0
    bound = 1 / math.sqrt(16)  # kaiming_uniform(a=sqrt(5)) on fan_in 16
    assert layer.lora_A["k"].weight.abs().max() <= bound
    assert layer.lora_A["g"].weight.abs().max() > bound  # N(0, 1/r=0.25) exceeds the uniform bound
    x = torch.randn(3, 16)
    torch.testing.assert_close(layer(x), layer.base_layer(x))


def test_active_and_named_adapters():
    layer, x = _layer(), torch.randn(4, 12)
    base = layer.base_layer(x)
    for name in ("a", "b"):
        A, B = layer.lora_A[name].weight, layer.lora_B[name].weight
        expected = base + lora_delta(x, A, B, layer.scaling[name])
        torch.testing.assert_close(layer(x, name), expected)
        layer.active_adapter = name
        torch.testing.assert_close(layer(x), expected)
    layer.active_adapter = None
    torch.testing.assert_close(layer(x), base)


def test_per_row_adapters_equal_row_by_row():
    layer, x = _layer(), torch.randn(4, 3, 12)
    rows = ["a", None, "b", "a"]
    out = layer(x, rows)
    for i, name in enumerate(rows):
        torch.testing.assert_close(out[i], layer(x[i:i + 1], name)[0] if name else layer.base_layer(x[i]))
    with pytest.raises(ShapeError, match="one name per row"):
        layer(x, ["a"])


def test_per_row_gradients_reach_only_used_adapters():
    layer = _layer()
    layer(torch.randn(2, 12), ["a", None]).sum().backward()
    assert layer.lora_A["a"].weight.grad is not None and layer.lora_B["b"].weight.grad is None


@pytest.mark.parametrize("conv1d", [False, True])
def test_merge_unmerge(conv1d):
    from transformers.pytorch_utils import Conv1D

    torch.manual_seed(0)
    base = Conv1D(10, 12) if conv1d else nn.Linear(12, 10)
    nn.init.normal_(base.bias)
    layer = LoraLinear(base)
    assert layer.fan_in_fan_out == conv1d and (layer.in_features, layer.out_features) == (12, 10)
    layer.add_adapter("a", r=4, alpha=8, scaling=2.0, init=False)
    layer.active_adapter = "a"
    x = torch.randn(5, 12)
    before, w0 = layer(x), base.weight.detach().clone()
    layer.merge("a")
    assert not torch.allclose(base.weight, w0)
    torch.testing.assert_close(layer(x), before, atol=1e-5, rtol=0)
    torch.testing.assert_close(base(x), before, atol=1e-5, rtol=0)
    with pytest.raises(AdapterError, match="unmerge"):
        layer(x, ["a"] * 5)
    layer.unmerge()
    torch.testing.assert_close(base.weight, w0, atol=1e-6, rtol=0)
    torch.testing.assert_close(layer(x), before, atol=1e-5, rtol=0)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_merge_refuses_nan_inf(bad):
    layer = _layer()
    w0 = layer.base_layer.weight.detach().clone()
    with torch.no_grad():
        layer.lora_B["a"].weight[0, 0] = bad
    with pytest.raises(AdapterError, match="NaN/Inf"):
        layer.merge("a")
    assert torch.equal(layer.base_layer.weight, w0) and layer.merged_adapters == []


def test_merge_refuses_overflow_in_half():
    layer = LoraLinear(nn.Linear(4, 4).half())
    layer.add_adapter("a", r=1, alpha=1, scaling=1.0, init=False)
    with torch.no_grad():
        layer.lora_A["a"].weight.fill_(300.0)
        layer.lora_B["a"].weight.fill_(300.0)  # 90000 > float16 max 65504
    with pytest.raises(AdapterError, match="NaN/Inf"):
        layer.merge("a")


def test_merge_hook_for_quantized_bases():
    class FakeQuant(nn.Module):
        """Stands in for a 4-bit linear: read-only `weight` property, merges via a hook."""
        in_features, out_features = 6, 4

        def __init__(self):
            super().__init__()
            self.register_buffer("packed", torch.randn(4, 6))
            self.received = None

        @property
        def weight(self):
            return self.packed.clone()

        def forward(self, x):
            return x @ self.packed.T

        def merge_delta(self, delta):
            self.received = delta.clone()
            self.packed += delta

    layer = LoraLinear(FakeQuant())
    layer.add_adapter("a", r=2, alpha=2, scaling=1.0, init=False)
    layer.merge("a")
    torch.testing.assert_close(layer.base_layer.received, layer.delta_weight("a"))
    layer.unmerge()
    torch.testing.assert_close(layer.base_layer.received, -layer.delta_weight("a"))


def test_embedding_layer_math_and_merge():
    torch.manual_seed(0)
    layer = LoraEmbedding(nn.Embedding(20, 6, padding_idx=0))
    layer.add_adapter("a", r=3, alpha=6, scaling=2.0, init=False)
    A, B = layer.lora_embedding_A["a"], layer.lora_embedding_B["a"]
    assert A.shape == (3, 20) and B.shape == (6, 3)
    ids = torch.tensor([[0, 3, 19], [5, 5, 1]])
    # padding_idx only stops gradients (F.embedding), so row 0 is adapted too, as in PEFT
    expected = layer.base_layer(ids) + 2.0 * (B @ A).T[ids]
    torch.testing.assert_close(layer(ids, "a"), expected)
    layer.active_adapter = "a"
    w0 = layer.base_layer.weight.detach().clone()
    layer.merge("a")
    torch.testing.assert_close(layer.base_layer(ids), expected, atol=1e-5, rtol=0)
    torch.testing.assert_close(layer(ids), expected, atol=1e-5, rtol=0)
    layer.unmerge()
    torch.testing.assert_close(layer.base_layer.weight, w0, atol=1e-6, rtol=0)
    fresh = LoraEmbedding(nn.Embedding(20, 6))
    fresh.add_adapter("z", r=2, alpha=2, scaling=1.0)
    assert torch.count_nonzero(fresh.lora_embedding_A["z"]) == 0  # PEFT: A zero, B normal


def test_adapter_names_validated():
    layer = LoraLinear(nn.Linear(4, 4))
    with pytest.raises(AdapterError):
        layer.add_adapter("a.b", r=1, alpha=1, scaling=1.0)
    with pytest.raises(AdapterError, match="cannot merge"):
        layer.merge("missing")
    with pytest.raises(AdapterError, match="not a linear"):
        LoraLinear(nn.LayerNorm(4))


# -- the fused training path (lora/fused.py) against the plain reference -----------------------
def _frozen_layer(bias, dropout, dtype=torch.float32, in_f=24, out_f=20, r=4):
    torch.manual_seed(0)
    layer = LoraLinear(nn.Linear(in_f, out_f, bias=bias, dtype=dtype))
    layer.base_layer.requires_grad_(False)
    layer.add_adapter("a", r=r, alpha=8, scaling=2.0, dropout=dropout, init=False)
    layer.active_adapter = "a"
    return layer.train()


def _run(layer, x, fused_on, monkeypatch, seed=1):
    from lorafleet.lora import fused
    monkeypatch.setattr(fused, "FUSED", fused_on)
    x = x.detach().clone().requires_grad_(True)
    torch.manual_seed(seed)            # the same dropout mask on both paths
    out = layer(x)
    assert (type(out.grad_fn).__name__ == "LoraLinearFunctionBackward") == fused_on
    (out * torch.linspace(-1, 1, out.shape[-1], dtype=out.dtype)).sum().backward()
    grads = [x.grad] + [p.grad for p in layer.parameters() if p.requires_grad]
    for p in layer.parameters():
        p.grad = None
    return out.detach(), grads


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("dropout", [0.0, 0.3])
def test_fused_forward_backward_equal_the_reference(bias, dropout, monkeypatch):
    layer, x = _frozen_layer(bias, dropout), torch.randn(3, 5, 24)
    out, grads = _run(layer, x, True, monkeypatch)
    ref_out, ref_grads = _run(layer, x, False, monkeypatch)
    torch.testing.assert_close(out, ref_out)
    assert len(grads) == len(ref_grads) == 3   # x, A, B: no gradient for the frozen base
    for g, ref in zip(grads, ref_grads):
        torch.testing.assert_close(g, ref)
    # eval mode: dropout off on both paths
    layer.eval()
    torch.testing.assert_close(_run(layer, x, True, monkeypatch)[0],
                               _run(layer, x, False, monkeypatch)[0])


def test_fused_in_bfloat16_and_under_gradient_checkpointing(monkeypatch):
    from torch.utils.checkpoint import checkpoint
    layer, x = _frozen_layer(True, 0.0, dtype=torch.bfloat16), torch.randn(2, 7, 24)
    layer.to(torch.bfloat16)
    x = x.to(torch.bfloat16)
    out, grads = _run(layer, x, True, monkeypatch)
    ref_out, ref_grads = _run(layer, x, False, monkeypatch)
    torch.testing.assert_close(out, ref_out, rtol=2e-2, atol=2e-2)
    for g, ref in zip(grads, ref_grads):
        torch.testing.assert_close(g, ref, rtol=2e-2, atol=5e-2)
    layer.float()
    xf = torch.randn(2, 7, 24, requires_grad=True)
    checkpoint(layer, xf, use_reentrant=False).sum().backward()
    direct = xf.grad.clone()
    xf.grad = None
    layer(xf).sum().backward()
    torch.testing.assert_close(xf.grad, direct)


def test_fused_path_only_where_it_applies():
    """A trainable base, several active adapters, DoRA, merged or per-row calls take the
    general path (their own tests above and in test_dora/test_merge hold them right)."""
    layer = _frozen_layer(True, 0.0)
    x = torch.randn(2, 24)
    assert type(layer(x).grad_fn).__name__ == "LoraLinearFunctionBackward"
    layer.add_adapter("b", r=2, alpha=2, scaling=1.0, init=False)
    layer.active_adapter = ["a", "b"]
    assert type(layer(x).grad_fn).__name__ != "LoraLinearFunctionBackward"
    layer.active_adapter = "a"
    assert type(layer(x, ["a", "b"]).grad_fn).__name__ != "LoraLinearFunctionBackward"
    layer.base_layer.weight.requires_grad_(True)
    assert type(layer(x).grad_fn).__name__ != "LoraLinearFunctionBackward"
