import math

import pytest
import torch
from hypothesis import given, settings, strategies as st

from lorafleet.analysis import subspace as sub
from lorafleet.errors import ShapeError


def test_phi_of_a_matrix_with_itself_is_one():
    a = torch.randn(8, 32, generator=torch.Generator().manual_seed(0))
    grid = sub.subspace_similarity_grid(a, a)
    # with itself, the top-i and top-j directions are nested: phi = min(i,j)/min(i,j) = 1
    assert torch.allclose(grid, torch.ones(8, 8, dtype=torch.float64), atol=1e-10)
    assert sub.subspace_similarity(a, 3 * a, 4, 7) == pytest.approx(1.0)


def test_phi_of_orthogonal_subspaces_is_zero():
    eye = torch.eye(16)
    a1, a2 = eye[:4] * torch.tensor([[4.], [3.], [2.], [1.]]), eye[4:10]
    assert sub.subspace_similarity_grid(a1, a2).abs().max() < 1e-12


def test_phi_hand_computed_partial_overlap():
    # A1 spans e0 (sv 2) and e1 (sv 1); A2 spans e1 (sv 5) and e2 (sv 1).
    a1 = torch.tensor([[2., 0, 0, 0], [0, 1, 0, 0]])
    a2 = torch.tensor([[0., 5, 0, 0], [0, 0, 1, 0]])
    # U1 = [e0, e1], U2 = [e1, e2]; U1^T U2 = [[0, 0], [1, 0]]
    assert sub.subspace_similarity(a1, a2, 1, 1) == pytest.approx(0.0)
    assert sub.subspace_similarity(a1, a2, 2, 1) == pytest.approx(1.0)      # 1 / min(2,1)
    assert sub.subspace_similarity(a1, a2, 2, 2) == pytest.approx(0.5)      # 1 / 2
    assert sub.subspace_similarity(a1, a2, 1, 2) == pytest.approx(0.0)
    # a 45-degree rotation: U1[:, :1] = e0, U2 = (e0 + e1)/sqrt2 -> cos^2 = 1/2
    a3 = torch.tensor([[1., 1, 0, 0]])
    assert sub.subspace_similarity(a1, a3, 1, 1) == pytest.approx(0.5)


@settings(max_examples=25, deadline=None)
@given(r1=st.integers(1, 6), r2=st.integers(1, 6), d=st.integers(6, 12), seed=st.integers(0, 99))
def test_grid_equals_reference_and_is_bounded(r1, r2, d, seed):
    g = torch.Generator().manual_seed(seed)
    a1, a2 = torch.randn(r1, d, generator=g), torch.randn(r2, d, generator=g)
    grid = sub.subspace_similarity_grid(a1, a2)
    assert grid.shape == (r1, r2)
    for i in range(1, r1 + 1):
        for j in range(1, r2 + 1):
            assert grid[i - 1, j - 1].item() == pytest.approx(
                sub.subspace_similarity_reference(a1, a2, i, j), abs=1e-9)
    assert grid.min() >= -1e-12 and grid.max() <= 1 + 1e-9


def test_delta_weight_and_singular_values():
    a = torch.tensor([[1., 0, 0], [0, 1, 0]])            # [r=2, in=3]
    b = torch.tensor([[3., 0], [0, 2], [0, 0], [0, 0]])  # [out=4, r=2]
    dw = sub.delta_weight(a, b, scaling=0.5)
    assert dw.shape == (4, 3)
    assert torch.allclose(sub.singular_values(dw)[:2], torch.tensor([1.5, 1.0], dtype=torch.float64))
    with pytest.raises(ShapeError, match="A \\[r, in\\] and B \\[out, r\\]"):
        sub.delta_weight(a, b.T)


def test_amplification_hand_computed():
    # dW = diag(2, 0, 0): top-1 directions u = v = e0. W = diag(0.5, 10, 10).
    # ||U^T W V^T||_F = |W[0,0]| = 0.5, ||dW||_F = 2 -> factor 4.
    dw = torch.diag(torch.tensor([2., 0, 0]))
    w = torch.diag(torch.tensor([0.5, 10, 10]))
    assert sub.projection_norm(w, dw, 1) == pytest.approx(0.5)
    assert sub.amplification_factor(w, dw, 1) == pytest.approx(4.0)
    # W aligned with dW: the factor is ||dW|| / ||W restricted|| = 2 / 10
    w2 = torch.diag(torch.tensor([10., 0.5, 0.5]))
    assert sub.amplification_factor(w2, dw, 1) == pytest.approx(0.2)
    # r = 2 with dW = diag(3, 4, 0): U^T W V^T picks W's top-left 2x2 block (any order)
    dw3 = torch.diag(torch.tensor([3., 4, 0]))
    w3 = torch.tensor([[1., 2, 9], [2, 1, 9], [9, 9, 9]])
    assert sub.amplification_factor(w3, dw3, 2) == pytest.approx(5.0 / math.sqrt(10))


def test_bad_shapes_name_the_shapes():
    with pytest.raises(ShapeError, match="same `in`"):
        sub.subspace_similarity_grid(torch.randn(2, 5), torch.randn(2, 6))
    with pytest.raises(ShapeError, match="i must be in \\[1, 2\\]"):
        sub.subspace_similarity(torch.randn(2, 5), torch.randn(2, 5), 3, 1)
    with pytest.raises(ShapeError, match="differ in shape"):
        sub.amplification_factor(torch.randn(3, 3), torch.randn(3, 4), 1)


def test_table7_w_row_is_ws_own_top_r_energy_and_no_directions_do_better():
    """The "W" row: ||U^T W V^T|| with W's own top-r directions = sqrt(sum of the r largest
    sigma^2), the largest any r orthonormal directions can give (Ky Fan)."""
    from lorafleet.analysis.subspace import own_projection_norm, projection_norm_on

    gen = torch.Generator().manual_seed(3)
    w = torch.randn(40, 24, generator=gen, dtype=torch.float64)
    sigma = torch.linalg.svdvals(w)
    assert own_projection_norm(w, 5) == pytest.approx(float(sigma[:5].pow(2).sum().sqrt()))
    for _ in range(20):
        u = torch.linalg.qr(torch.randn(40, 5, generator=gen, dtype=torch.float64))[0]
        v = torch.linalg.qr(torch.randn(24, 5, generator=gen, dtype=torch.float64))[0]
        assert projection_norm_on(w, u, v.T) <= own_projection_norm(w, 5) + 1e-12


def test_table7_random_row_matches_its_expectation():
    """Random r-dim directions on each side: E ||U^T W V^T||^2 = ||W||^2 r^2 / (out * in)."""
    from lorafleet.analysis.subspace import random_projection_norm

    gen = torch.Generator().manual_seed(4)
    w = torch.randn(30, 20, generator=gen, dtype=torch.float64)
    r = 4
    mean_sq = sum(random_projection_norm(w, r, gen) ** 2 for _ in range(400)) / 400
    expected = float(torch.linalg.matrix_norm(w)) ** 2 * r * r / (30 * 20)
    assert mean_sq == pytest.approx(expected, rel=0.1)
