"""The fast batched LoRA paths (grouped per segment, dense masked) equal the per-row reference,
for random shapes, ranks, segment layouts and base rows (hypothesis)."""
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lorafleet.serve.lora_ops import (ModuleLora, Segment, lora_delta_dense,
                                      lora_delta_grouped, lora_delta_reference, segment_mask)


@st.composite
def batches(draw):
    in_features = draw(st.integers(1, 40))
    out_features = draw(st.integers(1, 40))
    ranks = draw(st.lists(st.integers(1, 9), min_size=1, max_size=5))
    # Row runs: each run uses an adapter index or None (base rows).
    runs = draw(st.lists(st.tuples(st.one_of(st.none(), st.integers(0, len(ranks) - 1)),
                                   st.integers(1, 6)), min_size=1, max_size=8))
    scalings = draw(st.lists(st.floats(0.1, 4.0), min_size=len(ranks), max_size=len(ranks)))
    return in_features, out_features, ranks, runs, scalings, draw(st.integers(0, 2**16))


@settings(max_examples=60, deadline=None)
@given(batches())
def test_fast_paths_equal_reference(batch):
    in_features, out_features, ranks, runs, scalings, seed = batch
    gen = torch.Generator().manual_seed(seed)
    a = torch.randn(sum(ranks), in_features, generator=gen, dtype=torch.float64)
    bt = torch.randn(sum(ranks), out_features, generator=gen, dtype=torch.float64)
    starts = [sum(ranks[:i]) for i in range(len(ranks))]
    segments, row_weights, row = [], [], 0
    for adapter, n in runs:
        if adapter is not None:
            segments.append(Segment(row, row + n, starts[adapter], ranks[adapter],
                                    scalings[adapter]))
            s, r = starts[adapter], ranks[adapter]
            row_weights += [(a[s:s + r], bt[s:s + r], scalings[adapter])] * n
        else:
            row_weights += [None] * n
        row += n
    x = torch.randn(row, in_features, generator=gen, dtype=torch.float64)
    expected = lora_delta_reference(x, out_features, row_weights)
    module = ModuleLora(a, bt, segments)
    grouped = torch.zeros(row, out_features, dtype=torch.float64)
    lora_delta_grouped(grouped, x, module)
    module.mask = segment_mask(row, segments, sum(ranks), torch.float64, x.device)
    dense = torch.zeros(row, out_features, dtype=torch.float64)
    lora_delta_dense(dense, x, module)
    torch.testing.assert_close(grouped, expected)
    torch.testing.assert_close(dense, expected)
    base_rows = [i for i, w in enumerate(row_weights) if w is None]
    assert not dense[base_rows].any()


def test_reference_is_the_lora_formula():
    gen = torch.Generator().manual_seed(0)
    x, a, b = (torch.randn(3, 5, generator=gen), torch.randn(2, 5, generator=gen),
               torch.randn(4, 2, generator=gen))
    delta = lora_delta_reference(x, 4, [(a, b.t(), 0.5), None, (a, b.t(), 2.0)])
    torch.testing.assert_close(delta[0], 0.5 * (b @ a @ x[0]))
    torch.testing.assert_close(delta[2], 2.0 * (b @ a @ x[2]))
    assert not delta[1].any()
