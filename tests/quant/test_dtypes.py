"""bench.dtypes: the derived NF4 table against bitsandbytes, the generic codebook quantizer against
quant.nf4's round trip and bitsandbytes' FP4, and the Int4 / FP4 grids."""
import bitsandbytes.functional as bnbF
import pytest
import torch

from lorafleet.bench import dtypes
from lorafleet.quant import NF4_CODEBOOK, quantize_nf4
from lorafleet.quant.nf4 import nf4_codebook


def test_nf4_from_quantiles_equals_bitsandbytes_and_ours():
    derived = dtypes.nf4_from_quantiles()
    bnb = bnbF.get_4bit_type("nf4", device="cpu")
    torch.testing.assert_close(derived, bnb.sort().values, atol=1e-6, rtol=0)
    torch.testing.assert_close(derived, torch.tensor(NF4_CODEBOOK), atol=1e-6, rtol=0)
    # bnb's own (scipy) construction, the 16 distinct values of its 256-entry map
    normal_map = torch.unique(bnbF.create_normal_map(offset=0.9677083))
    torch.testing.assert_close(derived, normal_map, atol=1e-6, rtol=0)
    assert dtypes.NF4_OFFSET == pytest.approx(0.9677083, abs=1e-7)
    # the construction's structure: exact zero, 7 negative and 8 positive levels, range [-1, 1]
    assert (derived == 0).sum() == 1 and (derived < 0).sum() == 7 and (derived > 0).sum() == 8
    assert derived.min() == -1 and derived.max() == 1


def test_a_different_offset_gives_a_different_table():
    assert not torch.allclose(dtypes.nf4_from_quantiles(0.99), dtypes.nf4_from_quantiles())


@pytest.mark.parametrize("double_quant", [False, True])
@pytest.mark.parametrize("shape", [(64, 128), (33, 70), (300, 256)])
def test_generic_quantizer_with_nf4_equals_nf4_round_trip(shape, double_quant):
    w = torch.randn(shape, generator=torch.Generator().manual_seed(1))
    ours = quantize_nf4(w, 64, double_quant).dequantize(torch.float32)
    assert torch.equal(dtypes.fake_quantize(w, nf4_codebook(), 64, double_quant), ours)
    # the derived table differs from the stored one by < 1e-6, so the round trips agree too
    derived = dtypes.fake_quantize(w, dtypes.nf4_from_quantiles(), 64, double_quant)
    torch.testing.assert_close(derived, ours, atol=1e-5, rtol=0)


def test_fp4_codebook_is_bitsandbytes_fp4():
    bnb = torch.unique(bnbF.get_4bit_type("fp4", device="cpu"))
    torch.testing.assert_close(dtypes.fp4_codebook(), bnb, atol=1e-7, rtol=0)
    assert dtypes.fp4_codebook().numel() == 15


def test_generic_fp4_matches_bitsandbytes_fp4_round_trip():
    # bnb rounds FP4 with its own comparison tree; nearest-level rounding agrees except exactly
    # on midpoints, which Gaussian draws do not hit.
    w = torch.randn(128, 256, generator=torch.Generator().manual_seed(2))
    q, state = bnbF.quantize_4bit(w, blocksize=64, quant_type="fp4", compress_statistics=False)
    bnb = bnbF.dequantize_4bit(q, state)
    ours = dtypes.fake_quantize(w, dtypes.fp4_codebook(), 64, False)
    torch.testing.assert_close(ours, bnb, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("name", ["nf4", "fp4", "int4"])
def test_exact_on_codebook_points(name):
    codebook = dtypes.codebooks()[name]
    # each block holds every level and +-1, so its absmax is 1 and every value is a level
    levels = codebook.repeat(5)[:64]
    levels[0], levels[1] = -1.0, 1.0
    w = torch.stack([levels * s for s in (0.5, 2.0, 3.0)])
    for dq in (False, True):
        restored = dtypes.fake_quantize(w, codebook, 64, dq)
        # double quant stores the scales in 8 bits: off by a few percent at most
        torch.testing.assert_close(restored, w, atol=1e-6, rtol=0 if not dq else 3e-2)
    assert torch.equal(dtypes.fake_quantize(w, codebook, 64, False), w)


def test_int4_grid_and_error_bound():
    assert torch.equal(dtypes.int4_codebook() * 7, torch.arange(-7, 8, dtype=torch.float32))
    w = torch.randn(64, 256, generator=torch.Generator().manual_seed(3))
    restored = dtypes.fake_quantize(w, dtypes.int4_codebook(), 64, False)
    # rounding to steps of absmax / 7 errs by at most half a step
    absmax = w.reshape(-1, 64).abs().amax(dim=1, keepdim=True)
    assert ((restored - w).reshape(-1, 64).abs() <= absmax / 14 + 1e-6).all()


def test_nf4_beats_fp4_and_int4_on_gaussian_weights():
    w = [torch.randn(256, 256, generator=torch.Generator().manual_seed(4))]
    err = {name: dtypes.reconstruction(w, cb, False)["rel_frobenius"]
           for name, cb in dtypes.codebooks().items()}
    assert err["nf4"] < err["int4"] < err["fp4"]


def test_bits_per_param():
    assert dtypes.bits_per_param(64, False) == 4.5
    assert dtypes.bits_per_param(64, True) == pytest.approx(4 + 8 / 64 + 32 / (64 * 256))
