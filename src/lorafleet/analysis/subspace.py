"""The LoRA paper's sec. 7 analyses as plain functions on tensors.

- Subspace similarity (sec. 7.2, eq. 4): for two adapters' `A` matrices `A1 [r1, in]`,
  `A2 [r2, in]` with right-singular vectors `U1 [in, r1]`, `U2 [in, r2]`,
      phi(A1, A2, i, j) = ||U1[:, :i]^T U2[:, :j]||_F^2 / min(i, j)   in [0, 1].
  1 means the top-i and top-j directions span nested subspaces; 0 means orthogonal.
- Amplification factor (sec. 7.3): with `U [out, r]`, `V^T [r, in]` the top-r singular
  directions of `dW`, `||dW||_F / ||U^T W V^T||_F`: how much `dW` amplifies directions that
  were not emphasised in `W`.
- Singular values of `dW = scaling * B A`.
- Table 7's rows: W projected onto dW's top-r directions, onto its own (the "W" row) and onto
  random ones.
"""
from __future__ import annotations

import torch

from lorafleet.errors import ShapeError


def delta_weight(lora_a: torch.Tensor, lora_b: torch.Tensor, scaling: float = 1.0) -> torch.Tensor:
    """dW = scaling * B A.   A: [r, in], B: [out, r] -> [out, in] (fp64 for the analyses)."""
    if lora_a.dim() != 2 or lora_b.dim() != 2 or lora_b.shape[1] != lora_a.shape[0]:
        raise ShapeError(f"expected A [r, in] and B [out, r], found A {tuple(lora_a.shape)} "
                         f"and B {tuple(lora_b.shape)}")
    return scaling * (lora_b.double() @ lora_a.double())


def right_singular_vectors(a: torch.Tensor) -> torch.Tensor:
    """A: [r, in] -> U: [in, k] with k = min(r, in), columns ordered by singular value."""
    if a.dim() != 2:
        raise ShapeError(f"expected a 2-D A [r, in], found shape {tuple(a.shape)}")
    _, _, vh = torch.linalg.svd(a.double(), full_matrices=False)
    return vh.T


def subspace_similarity(a1: torch.Tensor, a2: torch.Tensor, i: int, j: int) -> float:
    """phi(A1, A2, i, j) of the LoRA paper's eq. 4; A1: [r1, in], A2: [r2, in]."""
    _check_ij(a1, a2, i, j)
    return float(subspace_similarity_grid(a1, a2)[i - 1, j - 1])


def subspace_similarity_grid(a1: torch.Tensor, a2: torch.Tensor) -> torch.Tensor:
    """phi(A1, A2, i, j) for every i <= r1, j <= r2, as a [r1, r2] tensor (row i-1, col j-1).

    ||U1[:, :i]^T U2[:, :j]||_F^2 is the sum of the squared entries of the top-left i x j block
    of M = U1^T U2, so one matrix product and a 2-D cumulative sum give the whole grid."""
    if a1.dim() != 2 or a2.dim() != 2 or a1.shape[1] != a2.shape[1]:
        raise ShapeError(f"expected A1 [r1, in] and A2 [r2, in] with the same `in`, found "
                         f"{tuple(a1.shape)} and {tuple(a2.shape)}")
    u1, u2 = right_singular_vectors(a1), right_singular_vectors(a2)
    overlap = (u1.T @ u2) ** 2                                   # [k1, k2]
    block_sums = overlap.cumsum(0).cumsum(1)                     # sum over [:i, :j]
    i = torch.arange(1, overlap.shape[0] + 1, dtype=torch.float64)[:, None]
    j = torch.arange(1, overlap.shape[1] + 1, dtype=torch.float64)[None, :]
    return block_sums / torch.minimum(i, j)


def subspace_similarity_reference(a1: torch.Tensor, a2: torch.Tensor, i: int, j: int) -> float:
    """The formula spelled out, one (i, j) at a time: the slow twin of the grid."""
    u1, u2 = right_singular_vectors(a1), right_singular_vectors(a2)
    return float(torch.linalg.matrix_norm(u1[:, :i].T @ u2[:, :j]) ** 2 / min(i, j))


def _check_ij(a1: torch.Tensor, a2: torch.Tensor, i: int, j: int) -> None:
    k1, k2 = min(a1.shape), min(a2.shape)
    if not (1 <= i <= k1 and 1 <= j <= k2):
        raise ShapeError(f"i must be in [1, {k1}] and j in [1, {k2}], found i={i}, j={j}")


def top_singular_directions(delta_w: torch.Tensor, r: int) -> tuple[torch.Tensor, torch.Tensor]:
    """dW: [out, in] -> (U [out, r], V^T [r, in]), its top-r left and right singular vectors."""
    u, _, vh = torch.linalg.svd(delta_w.double(), full_matrices=False)
    return u[:, :r], vh[:r]


def projection_norm(weight: torch.Tensor, delta_w: torch.Tensor, r: int) -> float:
    """||U^T W V^T||_F: how much of W lies in dW's top-r singular directions (sec. 7.3)."""
    if weight.shape != delta_w.shape:
        raise ShapeError(f"W {tuple(weight.shape)} and dW {tuple(delta_w.shape)} differ in shape")
    return projection_norm_on(weight, *top_singular_directions(delta_w, r))


def projection_norm_on(weight: torch.Tensor, u: torch.Tensor, vh: torch.Tensor) -> float:
    """||U^T W V^T||_F for given directions U [out, r], V^T [r, in]."""
    if u.shape[0] != weight.shape[0] or vh.shape[1] != weight.shape[1]:
        raise ShapeError(f"U {tuple(u.shape)} and V^T {tuple(vh.shape)} do not fit W "
                         f"{tuple(weight.shape)}")
    return float(torch.linalg.matrix_norm(u.double().T @ weight.double() @ vh.double().T))


def own_projection_norm(weight: torch.Tensor, r: int) -> float:
    """The paper's Table 7 "W" row: ||U^T W V^T||_F with U, V W's own top-r singular
    directions, which equals the root sum of W's r largest squared singular values."""
    u, vh = top_singular_directions(weight, r)
    return projection_norm_on(weight, u, vh)


def random_projection_norm(weight: torch.Tensor, r: int, generator: torch.Generator) -> float:
    """The paper's Table 7 "Random" row: W projected onto the top-r singular directions of a
    Gaussian random matrix of W's shape (r random orthonormal directions on each side)."""
    rand = torch.randn(weight.shape, generator=generator, dtype=torch.float64)
    u, vh = top_singular_directions(rand, r)
    return projection_norm_on(weight, u, vh)


def amplification_factor(weight: torch.Tensor, delta_w: torch.Tensor, r: int) -> float:
    """||dW||_F / ||U^T W V^T||_F with U, V the top-r singular directions of dW."""
    return float(torch.linalg.matrix_norm(delta_w.double())) / projection_norm(weight, delta_w, r)


def singular_values(delta_w: torch.Tensor) -> torch.Tensor:
    """dW: [out, in] -> its singular values, largest first."""
    return torch.linalg.svdvals(delta_w.double())
