"""NF4 against bitsandbytes' CPU implementation (the oracle): codes, scales, dequantized values,
double quantization, storage size."""
import math

import bitsandbytes.functional as bnbF
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lorafleet.errors import ConfigError
from lorafleet.quant import NF4_CODEBOOK, dequantize_nf4, dequantize_nf4_reference, quantize_nf4
from lorafleet.quant.nf4 import dynamic_map, pack_nibbles, unpack_nibbles

SHAPES = [(256, 128), (96, 200), (100, 37), (1, 4096)]  # (100, 37): 3700 is not whole blocks


def bnb_nf4(weight, block_size, double_quant):
    packed, state = bnbF.quantize_4bit(weight, blocksize=block_size, quant_type="nf4",
                                       compress_statistics=double_quant)
    return packed.view(-1), state


def test_codebooks_are_bnbs():
    assert torch.equal(torch.tensor(NF4_CODEBOOK), bnbF.get_4bit_type("nf4", device="cpu").float())
    assert torch.equal(dynamic_map(), bnbF.create_dynamic_map())


def test_nibble_order_round_trip():
    idx = torch.randint(0, 16, (64,), dtype=torch.uint8)
    packed = pack_nibbles(idx)
    assert packed[0] == idx[0] * 16 + idx[1]  # first element in the high nibble, as bnb
    assert torch.equal(unpack_nibbles(packed), idx)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("block_size", [64, 128])
def test_codes_and_values_equal_bnb(shape, dtype, block_size):
    torch.manual_seed(hash((shape, block_size)) % 1000)
    weight = torch.randn(shape, dtype=dtype) * 0.05
    ours = quantize_nf4(weight, block_size, double_quant=False)
    packed, state = bnb_nf4(weight, block_size, double_quant=False)
    n_full = weight.numel() // 2  # bnb pads an odd count with one nibble; our tail pads a block
    differing = (ours.codes[:n_full] != packed[:n_full]).sum().item()
    # Same arithmetic (reciprocal scaling, bucketize at fp32 midpoints): no tie rounds differently.
    assert differing == 0, f"{differing} of {n_full} code bytes differ from bitsandbytes"
    assert torch.equal(ours.absmax, state.absmax)
    expected = bnbF.dequantize_4bit(packed.view(-1, 1), state)  # in the weight's dtype
    assert torch.equal(dequantize_nf4_reference(ours), expected)
    assert dequantize_nf4(ours).shape == weight.shape


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_fast_dequantize_matches_reference(dtype):
    torch.manual_seed(0)
    nf4 = quantize_nf4(torch.randn(128, 192), 64)
    reference = dequantize_nf4_reference(nf4, torch.float32)
    assert torch.equal(dequantize_nf4(nf4, torch.float32), reference)  # fp32: bit for bit
    # 16-bit: codebook value and scale rounded to `dtype` before the product -> within 2 ulps.
    fast = dequantize_nf4(nf4, dtype).float()
    ulp = torch.finfo(dtype).eps
    assert torch.allclose(fast, reference, rtol=2 * ulp, atol=0)


@pytest.mark.parametrize("shape", [(512, 256), (300, 200), (2048, 64)])
def test_double_quant_matches_bnb(shape):
    torch.manual_seed(1)
    weight = torch.randn(shape)
    ours = quantize_nf4(weight, 64, double_quant=True)
    packed, state = bnb_nf4(weight, 64, double_quant=True)
    assert state.nested
    assert torch.equal(ours.absmax_offset, state.offset)
    assert torch.equal(ours.absmax_scale, state.state2.absmax)
    # 8-bit codes of the centred scales: bnb's C kernel rounds values within ~1e-5 of a midpoint
    # of the dynamic map differently from exact nearest rounding; count those and check each is
    # such a tie.
    differing = (ours.absmax_codes != state.absmax).nonzero().flatten()
    n_blocks = ours.absmax_codes.numel()
    print(f"\n{shape}: {len(differing)} of {n_blocks} 8-bit scale codes differ from bnb (ties)")
    assert len(differing) <= max(2, n_blocks // 100)
    code = dynamic_map()
    absmax = quantize_nf4(weight, 64, double_quant=False).absmax - state.offset
    for i in differing.tolist():
        a, b = int(ours.absmax_codes[i]), int(state.absmax[i])
        assert abs(a - b) == 1
        value = absmax[i] / state.state2.absmax[i // 256]
        midpoint = (code[a] + code[b]) / 2
        assert abs(value - midpoint) < 1e-5, (i, value, midpoint)
    # Dequantized values: equal where the codes agree; everywhere within one 8-bit step.
    expected = bnbF.dequantize_4bit(packed.view(-1, 1), state)
    ours_values = dequantize_nf4(ours, torch.float32)
    scale_error = (ours.scales() - (bnbF.dequantize_blockwise(state.absmax, state.state2)
                                    + state.offset)).abs().max()
    map_step = (code[1:] - code[:-1]).max()  # the widest step of the 8-bit map
    assert scale_error <= map_step * state.state2.absmax.max() * (1 + 1e-6)
    assert torch.allclose(ours_values, expected, rtol=0, atol=float(scale_error) + 1e-7)
    same_blocks = (ours.absmax_codes == state.absmax).repeat_interleave(64)[: weight.numel()]
    assert torch.equal(ours_values.view(-1)[same_blocks], expected.view(-1)[same_blocks])


def test_double_quant_storage_is_under_4_13_bits():
    weight = torch.randn(1024, 1024)
    nf4 = quantize_nf4(weight, 64, double_quant=True)
    stored = sum(t.untyped_storage().nbytes() for t in nf4.stored_tensors().values())
    assert nf4.nbytes == stored  # measured from the tensors actually held
    assert nf4.bits_per_param <= 4.13
    assert math.isclose(nf4.bits_per_param, 4 + 8 / 64 + 32 / (64 * 256) + 32 / 2**20)
    assert quantize_nf4(weight, 64, double_quant=False).bits_per_param == 4.5


def test_padding_of_ragged_sizes_is_recorded_and_sliced():
    weight = torch.randn(7, 9)  # 63 elements: one short block
    nf4 = quantize_nf4(weight, 64)
    assert nf4.codes.numel() == 32 and nf4.shape == weight.shape
    restored = dequantize_nf4(nf4, torch.float32)
    assert restored.shape == (7, 9)
    assert torch.equal(restored, dequantize_nf4_reference(nf4, torch.float32))


def test_all_zero_block_and_exact_values():
    weight = torch.zeros(2, 64)
    weight[1, :16] = torch.tensor(NF4_CODEBOOK) * 3.0  # codebook points are stored exactly
    restored = dequantize_nf4(quantize_nf4(weight, 64, double_quant=False), torch.float32)
    assert torch.equal(restored[0], weight[0])
    assert torch.allclose(restored[1], weight[1], atol=1e-6)


@pytest.mark.parametrize("kwargs, match", [
    (dict(block_size=0), "block_size"), (dict(block_size=30), "block_size"),
])
def test_bad_block_size(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        quantize_nf4(torch.randn(4, 64), **kwargs)


def test_bad_weights():
    with pytest.raises(ConfigError, match="floating-point"):
        quantize_nf4(torch.ones(4, 64, dtype=torch.int64))
    with pytest.raises(ConfigError, match="NaN"):
        quantize_nf4(torch.full((4, 64), float("nan")))
    with pytest.raises(ConfigError, match="empty"):
        quantize_nf4(torch.empty(0, 64))
    with pytest.raises(ConfigError, match="dtype"):
        dequantize_nf4(quantize_nf4(torch.randn(64)), torch.int8)


# Largest distance from a value in [-1, 1] to its nearest NF4 point: half the widest gap.
HALF_GAP = max(b - a for a, b in zip(NF4_CODEBOOK, NF4_CODEBOOK[1:])) / 2


@settings(max_examples=25, deadline=None)
@given(rows=st.integers(1, 40), cols=st.integers(1, 70), block=st.sampled_from([32, 64, 128]),
       double=st.booleans(), scale=st.floats(1e-3, 1e3))
def test_round_trip_error_is_bounded(rows, cols, block, double, scale):
    weight = torch.randn(rows, cols) * scale
    nf4 = quantize_nf4(weight, block, double_quant=double)
    restored = dequantize_nf4(nf4, torch.float32)
    flat = torch.nn.functional.pad(weight.reshape(-1), (0, (-weight.numel()) % block))
    absmax = flat.view(-1, block).abs().amax(1)
    # double quantization perturbs each scale by at most one 8-bit step of its 256-block
    bound = absmax * HALF_GAP + ((nf4.scales() - absmax).abs() if double else 0) + 1e-6 * scale
    error = torch.nn.functional.pad((restored - weight).reshape(-1).abs(), (0, flat.numel()
                                                                             - weight.numel()))
    assert (error.view(-1, block) <= bound.unsqueeze(1) * (1 + 1e-5)).all()
