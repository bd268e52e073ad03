"""Linear4bit and the model swap: forward/backward against F.linear over the dequantized weight,
device/dtype moves, state dicts, merging a delta, memory accounting, the streaming loader."""
import logging

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lorafleet.errors import ConfigError
from lorafleet.models import load_model
from .quant_helpers import bnb_nf4_transformers

from lorafleet.quant.linear4bit import linear_nf4, linear_nf4_reference
from lorafleet.quant.nf4 import unpack_nibbles
from lorafleet.quant import (Embedding4bit, Linear4bit, dequantize_nf4, load_quantized_model,
                             memory_report, quantize_model, quantize_nf4)


def make_layer(in_features=128, out_features=96, bias=True, seed=0, **kwargs):
    torch.manual_seed(seed)
    return Linear4bit.from_module(nn.Linear(in_features, out_features, bias=bias), **kwargs)


@pytest.mark.parametrize("bias", [True, False])
def test_forward_equals_linear_over_dequantized_weight(bias):
    layer = make_layer(bias=bias)
    x = torch.randn(3, 12, 128)  # 36 tokens: the torch path (the C kernel takes <= 32), exact
    w = dequantize_nf4(layer.nf4, torch.float32)
    torch.testing.assert_close(layer(x), F.linear(x, w, layer.bias), rtol=0, atol=0)
    assert torch.equal(layer.weight, w)
    xb = x.bfloat16()
    expected = F.linear(xb, dequantize_nf4(layer.nf4, torch.bfloat16),
                        None if layer.bias is None else layer.bias.bfloat16())
    torch.testing.assert_close(layer(xb), expected, rtol=0, atol=0)


def test_backward_reaches_input_only():
    layer = make_layer()
    x = torch.randn(4, 128, requires_grad=True)
    layer(x).square().sum().backward()
    x_ref = x.detach().clone().requires_grad_(True)
    F.linear(x_ref, layer.weight, layer.bias).square().sum().backward()
    torch.testing.assert_close(x.grad, x_ref.grad)
    assert not any(p.requires_grad for p in layer.parameters())


def test_to_bf16_keeps_storage_dtypes_and_moves_compute():
    layer = make_layer()
    before = {k: v.clone() for k, v in layer.state_dict().items()}
    layer.to(torch.bfloat16)
    assert layer.dtype == torch.bfloat16 and layer.weight.dtype == torch.bfloat16
    assert layer.absmax_scale.dtype == torch.float32 and layer.codes.dtype == torch.uint8
    for name in ("codes", "absmax_codes", "absmax_scale", "absmax_offset"):
        assert torch.equal(layer.state_dict()[name], before[name])
    assert layer.bias.dtype == torch.bfloat16
    layer.float()
    assert layer.dtype == torch.float32


def test_state_dict_round_trip_through_meta_and_assign():
    layer = make_layer(double_quant=True)
    with torch.device("meta"):
        empty = Linear4bit(128, 96, bias=True)
    empty.load_state_dict(layer.state_dict(), assign=True)
    x = torch.randn(2, 128)
    assert torch.equal(empty(x), layer(x))


def test_to_empty_from_meta_then_set_weight():
    with torch.device("meta"):
        layer = Linear4bit(64, 32, bias=False)
    layer.to_empty(device="cpu")
    assert layer.codes.device.type == "cpu" and layer.absmax_scale.dtype == torch.float32
    weight = torch.randn(32, 64)
    layer.set_weight(weight)
    assert torch.equal(layer.weight, quantize_nf4(weight, 64).dequantize(torch.float32))


def test_loading_a_float_weight_quantizes_it():
    torch.manual_seed(0)
    linear = nn.Linear(64, 32)
    layer = Linear4bit(64, 32)
    layer.load_state_dict(linear.state_dict())
    expected = quantize_nf4(linear.weight.detach(), 64).dequantize(torch.float32)
    assert torch.equal(layer.weight, expected)
    assert torch.equal(layer.bias, linear.bias.detach())


def test_conv1d_is_transposed():
    from lorafleet.models import Conv1D

    torch.manual_seed(0)
    conv = Conv1D(64, 192)
    layer = Linear4bit.from_module(conv)
    assert (layer.in_features, layer.out_features, layer.fan_in_fan_out) == (64, 192, True)
    x = torch.randn(5, 64)
    w = quantize_nf4(conv.weight.detach().t(), 64).dequantize(torch.float32)
    torch.testing.assert_close(layer(x), x @ w.t() + conv.bias, rtol=0, atol=1e-6)
    fresh = Linear4bit(64, 192, fan_in_fan_out=True)
    fresh.load_state_dict(conv.state_dict())  # a GPT-2 checkpoint's [in, out] weight
    assert torch.equal(fresh.weight, w)


@pytest.mark.parametrize("double_quant", [False, True])
def test_merge_delta_requantizes_on_the_same_grid_and_warns(double_quant, caplog):
    layer = make_layer(bias=False, double_quant=double_quant)
    w = layer.weight
    stored = {k: v.clone() for k, v in layer.state_dict().items()}
    with caplog.at_level(logging.WARNING, logger="lorafleet.quant"):
        assert layer.merge_delta(torch.zeros_like(w)) == 0.0  # a zero merge changes nothing
    assert "rounded to NF4" in caplog.text
    assert all(torch.equal(v, layer.state_dict()[k]) for k, v in stored.items())
    delta = torch.randn_like(w) * 0.002
    rms = layer.merge_delta(delta)
    merged = layer.weight
    # Each element lands on the nearest NF4 point of its block's (kept or grown) grid:
    naive = quantize_nf4(w + delta, 64, double_quant).dequantize(torch.float32)
    naive_rms = (naive - (w + delta)).pow(2).mean().sqrt().item()
    assert rms == pytest.approx((merged - (w + delta)).pow(2).mean().sqrt().item())
    assert rms <= naive_rms * 1.05  # as close as re-quantizing from scratch
    codes_before = unpack_nibbles(stored["codes"])
    changed = (unpack_nibbles(layer.codes) != codes_before).float().mean().item()
    assert changed < 0.2, changed  # a small delta moves only the codes it pushes past a midpoint


def test_merge_delta_grows_a_block_that_outgrows_its_scale():
    layer = make_layer(bias=False, double_quant=False)
    w = layer.weight
    delta = torch.zeros_like(w)
    delta[0, 0] = 10 * w.abs().max()
    layer.merge_delta(delta)
    torch.testing.assert_close(layer.weight[0, 0], (w + delta)[0, 0])  # new absmax: exact
    with pytest.raises(ConfigError, match="delta shape"):
        layer.merge_delta(torch.zeros(3, 3))


def test_bad_shapes_and_block_sizes():
    with pytest.raises(ConfigError, match="block_size"):
        Linear4bit(64, 64, block_size=6)
    with pytest.raises(ConfigError, match="expected weight of shape"):
        Linear4bit(64, 32).set_weight(torch.randn(64, 64))


def test_quantize_model_skips_head_and_embeddings_unless_asked(llama_dir):
    model = quantize_model(load_model(llama_dir))
    assert isinstance(model.lm_head, nn.Linear)
    assert isinstance(model.model.embed_tokens, nn.Embedding)
    assert isinstance(model.model.layers[0].mlp.down_proj, Linear4bit)
    everything = quantize_model(load_model(llama_dir), skip=(), include_embeddings=True)
    assert isinstance(everything.lm_head, Linear4bit)
    embed = everything.model.embed_tokens
    assert isinstance(embed, Embedding4bit)
    ids = torch.tensor([[3, 7, 300]])
    torch.testing.assert_close(embed(ids), embed.weight[ids], rtol=0, atol=0)
    with pytest.raises(ConfigError, match="no nn.Linear"):
        quantize_model(nn.Sequential(nn.ReLU()))


@pytest.mark.slow
def test_quantized_llama_equals_bnb_oracle_and_stays_close(llama_dir):
    ids = torch.randint(0, 384, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        full = load_model(llama_dir)(ids)
        bf16 = load_model(llama_dir, dtype=torch.bfloat16)(ids).float()
        nf4 = quantize_model(load_model(llama_dir), double_quant=False)(ids)
        oracle = bnb_nf4_transformers(llama_dir, double_quant=False)(ids).logits
        nf4_dq = quantize_model(load_model(llama_dir))(ids)
        oracle_dq = bnb_nf4_transformers(llama_dir, double_quant=True)(ids).logits
    torch.testing.assert_close(nf4, oracle, rtol=0, atol=1e-5)
    # double quant: a handful of 8-bit scale codes round a tie differently from bnb's C kernel
    torch.testing.assert_close(nf4_dq, oracle_dq, rtol=0, atol=2e-3)

    def rel(a):
        return ((a - full).norm() / full.norm()).item()

    print(f"\nrelative logit error vs fp32: NF4 {rel(nf4):.4f}, NF4+DQ {rel(nf4_dq):.4f}, "
          f"bf16 {rel(bf16):.4f}, max |dlogit| NF4+DQ {(nf4_dq - full).abs().max():.4f} "
          f"(logit scale {full.abs().max():.3f})")
    # N(0, 0.02) random weights, hidden 64: NF4's per-weight error (~10% of a block's spread)
    # reaches the logits at about that size; bf16 is an order of magnitude closer.
    assert rel(nf4_dq) < 0.2 and rel(nf4) < 0.2
    assert rel(bf16) < rel(nf4_dq) / 5


def test_streaming_loader_equals_quantize_after_load(llama_dir):
    ids = torch.randint(0, 384, (1, 10), generator=torch.Generator().manual_seed(1))
    streamed = load_quantized_model(llama_dir, dtype=torch.float32)
    swapped = quantize_model(load_model(llama_dir))
    with torch.no_grad():
        assert torch.equal(streamed(ids), swapped(ids))


def test_gpt2_quantizes_its_conv1d(gpt2_dir):
    ids = torch.randint(0, 384, (1, 12), generator=torch.Generator().manual_seed(2))
    streamed = load_quantized_model(gpt2_dir, dtype=torch.float32)
    assert isinstance(streamed.transformer.h[0].attn.c_attn, Linear4bit)
    with torch.no_grad():
        full = load_model(gpt2_dir)(ids)
        ours = streamed(ids)
        assert torch.equal(ours, quantize_model(load_model(gpt2_dir))(ids))
    assert ((ours - full).norm() / full.norm()) < 0.1


def test_memory_report_counts_stored_bytes(llama_dir):
    model = quantize_model(load_model(llama_dir))
    report = memory_report(model)
    layers = [m for m in model.modules() if isinstance(m, Linear4bit)]
    assert report.quantized_params == sum(m.in_features * m.out_features for m in layers)
    assert report.quantized_bytes == sum(
        sum(b.numel() * b.element_size() for b in m.buffers()) for m in layers)
    assert 4.12 < report.bits_per_quantized_param < 4.2  # small layers: a few fp32 scales more
    full = sum(p.numel() * p.element_size() for p in load_model(llama_dir).parameters())
    assert report.total_bytes < full


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("tokens", [1, 6, 40])  # few-token path (scales after the matmul) / plain
@pytest.mark.parametrize("shape,block", [((1100, 256), 64), ((300, 384), 128), ((40, 100), 64)])
def test_chunked_linear_matches_reference(dtype, tokens, shape, block, monkeypatch):
    from lorafleet.quant import linear4bit

    from lorafleet.quant import kernel

    monkeypatch.setattr(kernel, "KERNEL_MAX_TOKENS", 0)  # the torch paths (kernel: below)
    monkeypatch.setattr(linear4bit, "CHUNK_BYTES", 64 * 1024)  # force several chunks
    monkeypatch.setattr(linear4bit, "FEW_TOKENS_CHUNK_BYTES", 96 * 1024)  # and a ragged last one
    calls = []
    few_tokens = linear4bit._linear_nf4_few_tokens
    monkeypatch.setattr(linear4bit, "_linear_nf4_few_tokens",
                        lambda *a: calls.append(1) or few_tokens(*a))
    torch.manual_seed(0)
    nf4 = quantize_nf4(torch.randn(shape) * 0.05, block)
    x = torch.randn(tokens, shape[1]).to(dtype)
    bias = torch.randn(shape[0])
    got = linear4bit.linear_nf4(x, nf4, bias)
    expected = linear4bit.linear_nf4_reference(x, nf4, bias)
    assert got.shape == expected.shape == (tokens, shape[0]) and got.dtype == dtype
    # the path taken: few tokens in bf16/fp32 on whole-block rows that need several chunks
    assert bool(calls) == (tokens <= linear4bit.FEW_TOKENS and dtype != torch.float16
                           and shape[1] % block == 0 and shape[0] * shape[1] * dtype.itemsize
                           > linear4bit.CHUNK_BYTES)
    tol = {torch.float32: dict(rtol=0, atol=1e-5), torch.float16: dict(rtol=2e-3, atol=2e-3),
           torch.bfloat16: dict(rtol=2e-2, atol=2e-2)}[dtype]
    torch.testing.assert_close(got, expected, **tol)
    if dtype != torch.float32:  # as close to the exact (fp32) product as the reference is
        exact = linear4bit.linear_nf4_reference(x.float(), nf4, bias)
        err, ref_err = (got.float() - exact).norm(), (expected.float() - exact).norm()
        assert err <= 1.5 * ref_err + 1e-6, (err, ref_err)


@pytest.fixture(scope="module")
def kernel_cache(tmp_path_factory):
    return tmp_path_factory.mktemp("cache")


@pytest.fixture
def kernel(monkeypatch, kernel_cache):
    """The fused C kernel module, built from source into a fresh cache (once per module)."""
    from lorafleet.quant import kernel

    monkeypatch.setenv("XDG_CACHE_HOME", str(kernel_cache))
    kernel._load.cache_clear()
    yield kernel
    kernel._load.cache_clear()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape,block,double_quant", [((300, 384), 64, True),
                                                      ((70, 512), 128, False), ((1, 64), 64, True)])
def test_kernel_matches_reference(kernel, dtype, shape, block, double_quant, kernel_cache):
    if not kernel.kernel_available():  # the dev box (AVX-512, gcc) always has it
        pytest.skip("no C compiler / AVX-512 here")
    torch.manual_seed(0)
    nf4 = quantize_nf4(torch.randn(shape) * 0.05, block, double_quant)
    bias = torch.randn(shape[0])
    bf16_kernel = dtype == torch.bfloat16 and kernel._load().has_bf16
    for tokens in (1, 4, 11, 16, 32):  # groups of 8 (bf16) or 3 tokens and their tails
        x = torch.randn(tokens, shape[1]).to(dtype)
        got = kernel.nf4_kernel_linear(x, nf4)
        if tokens > kernel.FP32_KERNEL_MAX_TOKENS and not bf16_kernel:
            assert got is None
            continue
        assert got is not None and got.shape == (tokens, shape[0]) and got.dtype == torch.float32
        exact = linear_nf4_reference(x.float(), nf4)  # fp32 dequantized weight, fp32 matmul
        reference = linear_nf4_reference(x, nf4, bias)
        if bf16_kernel:  # W rounded to bf16 like the reference's, but no bf16 output rounding
            torch.testing.assert_close(got, exact, rtol=1e-2, atol=1e-2)
            ref_error = (reference.float() - bias - exact).norm()
            assert (got - exact).norm() < ref_error
        else:
            torch.testing.assert_close(got, exact, rtol=1e-5, atol=1e-5)
        # the public path takes the kernel and rounds once to x's dtype
        layer_out = linear_nf4(x, nf4, bias)
        assert layer_out.dtype == dtype
        torch.testing.assert_close(layer_out, (got + bias).to(dtype), rtol=0, atol=0)
        tol = dict(rtol=0, atol=1e-5) if dtype == torch.float32 else dict(rtol=2e-2, atol=2e-2)
        torch.testing.assert_close(layer_out, reference, **tol)
    assert list(kernel_cache.glob("lorafleet/nf4_kernel_*.so"))  # built into the cache


def test_kernel_falls_back_cleanly(kernel, tmp_path, monkeypatch, caplog):
    torch.manual_seed(0)
    nf4 = quantize_nf4(torch.randn(64, 128) * 0.05, 64)
    x = torch.randn(2, 128)
    expected = linear_nf4_reference(x, nf4)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    monkeypatch.setenv("CC", "/bin/false")  # a compiler that fails
    with caplog.at_level(logging.INFO, logger="lorafleet.quant"):
        assert not kernel.kernel_available()
    assert "NF4 kernel unavailable" in caplog.text
    torch.testing.assert_close(linear_nf4(x, nf4), expected, rtol=0, atol=1e-5)  # torch path
    kernel._load.cache_clear()
    monkeypatch.setenv("LORAFLEET_NF4_KERNEL", "0")
    assert not kernel.kernel_available()
    monkeypatch.delenv("LORAFLEET_NF4_KERNEL")
    monkeypatch.delenv("CC")
    kernel._load.cache_clear()
    if kernel.kernel_available():  # what it does not take: block 32, many tokens, ragged rows
        assert kernel.nf4_kernel_linear(x, quantize_nf4(torch.randn(64, 128), 32)) is None
        assert kernel.nf4_kernel_linear(torch.randn(17, 128), nf4) is None  # fp32: <= 16
        assert kernel.nf4_kernel_linear(torch.randn(33, 128).bfloat16(), nf4) is None
        assert kernel.nf4_kernel_linear(torch.randn(1, 100), quantize_nf4(torch.randn(8, 100))) \
            is None
