"""Adapter arithmetic: several LoRA adapters -> one new adapter (PEFT's `add_weighted_adapter`).

Per module, with adapter i's A_i [r_i, in], B_i [out, r_i], scaling s_i and weight w_i:
  linear, ties, dare_linear, dare_ties, magnitude_prune: the method is applied to the A's and to
      the B's separately, A's weighted by sign(w s) sqrt|w s| and B's by sqrt|w s| (so their
      product carries w s once); every adapter must have the same rank (TIES: Yadav et al.
      2306.01708; DARE: Yu et al. 2311.03099, random drop then rescale by 1 / density);
  cat: A = [w_1 s_1 A_1; w_2 s_2 A_2; ...], B = [B_1 B_2 ...]: exactly sum_i w_i s_i B_i A_i,
      rank sum(r_i);
  svd (and ties_svd, dare_*_svd, magnitude_prune_svd): the method on the deltas s_i B_i A_i,
      then the top `svd_rank` singular directions (default: the largest rank): B = U S, A = Vh.
The new adapter has r = lora_alpha = its rank (scaling 1), no rank/alpha patterns, and targets
the union of the adapters' targets, as PEFT writes it. DARE draws its masks from torch's global
RNG in PEFT's order (modules in `module_order`, A's then B's, adapters in order), so the same RNG
state gives PEFT's masks.
"""
from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Sequence
from pathlib import Path

import torch

from lorafleet.errors import AdapterError, ConfigError
from lorafleet.lora.config import LoraConfig
from lorafleet.lora.peft_format import PREFIX, LoraModule, PeftAdapter, load_peft, write_adapter

LINEAR_FAMILY = ("linear", "ties", "dare_linear", "dare_ties", "magnitude_prune")
SVD_FAMILY = ("svd", "ties_svd", "dare_linear_svd", "dare_ties_svd", "magnitude_prune_svd")
COMBINATION_TYPES = LINEAR_FAMILY + ("cat",) + SVD_FAMILY
NEEDS_DENSITY = ("ties", "dare_linear", "dare_ties", "magnitude_prune", "ties_svd",
                 "dare_linear_svd", "dare_ties_svd", "magnitude_prune_svd")


# -- the task-vector methods (PEFT's merge_utils, same operations in the same order) ------------
def _prune_magnitude(tensor: torch.Tensor, density: float) -> torch.Tensor:
    if density >= 1:
        return tensor
    mask = torch.zeros_like(tensor).reshape(-1)
    mask[torch.topk(tensor.abs().reshape(-1), k=int(density * tensor.numel())).indices] = 1
    return tensor * mask.reshape(tensor.shape)


def _prune_random(tensor: torch.Tensor, density: float) -> torch.Tensor:
    if density >= 1:
        return tensor
    return tensor * torch.bernoulli(torch.full_like(tensor, density)) / density


def _majority_mask(stacked: torch.Tensor, method: str) -> torch.Tensor:
    sign = stacked.sign()
    magnitude = stacked.sum(0) if method == "total" else sign.sum(0)
    return sign == torch.where(magnitude >= 0, 1, -1)


def task_vectors(tensors: list[torch.Tensor], weights: torch.Tensor, method: str,
                 density: float | None = None, majority_sign_method: str = "total") -> torch.Tensor:
    """Combine same-shaped tensors: `method` is linear/ties/dare_linear/dare_ties/magnitude_prune
    (the `_svd` suffix already stripped; svd itself is linear)."""
    if method in ("ties", "magnitude_prune"):
        tensors = [_prune_magnitude(t, density) for t in tensors]
    elif method in ("dare_linear", "dare_ties"):
        tensors = [_prune_random(t, density) for t in tensors]
    stacked = torch.stack(tensors)
    weighted = stacked * weights.view((-1,) + (1,) * (stacked.dim() - 1))
    if method in ("ties", "dare_ties"):
        mask = _majority_mask(stacked, majority_sign_method)
        return (weighted * mask).sum(0) / mask.sum(0).clamp(min=1.0)
    return weighted.sum(0)


# -- one module ----------------------------------------------------------------------------------
def combine_module(parts: Sequence[tuple[LoraModule, float]], combination_type: str, rank: int,
                   density: float | None = None, majority_sign_method: str = "total",
                   svd_clamp: float | None = None, svd_full_matrices: bool = True
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """(A, B) of the combined module from (module, weight) of the adapters that adapt it."""
    dtype = parts[0][0].A.dtype
    if combination_type == "cat":
        A = torch.cat([m.A * w * m.scaling for m, w in parts], 0)
        B = torch.cat([m.B for m, _ in parts], 1)
        pad = rank - A.shape[0]   # a module some adapters skip: zero rows, as PEFT allocates
        return (torch.cat([A, A.new_zeros(pad, A.shape[1])]),
                torch.cat([B, B.new_zeros(B.shape[0], pad)], 1))
    if combination_type in LINEAR_FAMILY:
        signed = [w * m.scaling for m, w in parts]
        wa = torch.tensor([math.sqrt(abs(v)) * (1 if v >= 0 else -1) for v in signed])
        wb = torch.tensor([math.sqrt(abs(v)) for v in signed])
        A = task_vectors([m.A for m, _ in parts], wa.to(dtype), combination_type, density,
                         majority_sign_method)
        B = task_vectors([m.B for m, _ in parts], wb.to(dtype), combination_type, density,
                         majority_sign_method)
        return A.to(dtype), B.to(dtype)
    method = "linear" if combination_type == "svd" else combination_type.removesuffix("_svd")
    deltas = [(m.B @ m.A) * m.scaling for m, _ in parts]
    delta = task_vectors(deltas, torch.tensor([w for _, w in parts]).to(deltas[0].dtype), method,
                         density, majority_sign_method)
    U, S, Vh = torch.linalg.svd(delta, full_matrices=svd_full_matrices)
    U, Vh = U[:, :rank] @ torch.diag(S[:rank]), Vh[:rank, :]
    if svd_clamp is not None:
        high = torch.quantile(torch.cat([U.flatten(), Vh.flatten()]), svd_clamp)
        U, Vh = U.clamp(-high, high), Vh.clamp(-high, high)
    return Vh, U


# -- several adapters ----------------------------------------------------------------------------
def _natural(name: str) -> list:
    return [int(p) if p.isdigit() else p for p in re.split(r"(\d+)", name)]


def check_weights(names: Sequence[str], weights: Sequence[float]) -> None:
    """One finite number per adapter (combining here, merging into a checkpoint in merge.py);
    ConfigError naming the adapter otherwise."""
    if len(weights) != len(names):
        raise ConfigError(f"weights: expected one weight per adapter ({len(names)}: "
                          f"{list(names)}), found {len(weights)}")
    for name, w in zip(names, weights):
        if isinstance(w, bool) or not isinstance(w, (int, float)) or not math.isfinite(w):
            raise ConfigError(f"weights: the weight of adapter {name!r} must be a finite number, "
                              f"found {w!r}")


def _check(adapters: dict[str, PeftAdapter], weights: Sequence[float], combination_type: str,
           density: float | None, majority_sign_method: str) -> None:
    names = list(adapters)
    if combination_type not in COMBINATION_TYPES:
        raise ConfigError(f"combination_type: expected one of {COMBINATION_TYPES}, found "
                          f"{combination_type!r}")
    if len(names) < 1:
        raise ConfigError("adapters: name at least one adapter to combine")
    check_weights(names, weights)
    if combination_type in NEEDS_DENSITY and len(names) > 1:
        if (isinstance(density, bool) or not isinstance(density, (int, float))
                or not 0 < density <= 1):
            raise ConfigError(f"density: combination_type {combination_type!r} needs a density "
                              f"in (0, 1] (the fraction of values kept), found {density!r}")
    if majority_sign_method not in ("total", "frequency"):
        raise ConfigError(f"majority_sign_method: expected 'total' or 'frequency', found "
                          f"{majority_sign_method!r}")
    for field in ("base_model_name_or_path", "fan_in_fan_out"):
        values = {n: getattr(a.config, field) for n, a in adapters.items()}
        known = {n: v for n, v in values.items() if v is not None}
        if len(set(known.values())) > 1:
            raise AdapterError(f"cannot combine adapters with different {field}: {known}")
    for name, adapter in adapters.items():
        if adapter.config.use_dora:
            raise AdapterError(f"adapter {name!r}: use_dora=true: DoRA adapters cannot be "
                               "combined (their magnitude vectors have no weighted sum)")
        if not adapter.has_data:
            raise AdapterError(f"adapter {name!r}: its tensors were not read")
        if adapter.extras:
            raise AdapterError(f"adapter {name!r}: tensors {sorted(adapter.extras)[:3]} are not "
                               "LoRA weights (biases, modules_to_save) and cannot be combined")
    shapes: dict[str, tuple[str, tuple, tuple]] = {}
    for name, adapter in adapters.items():
        for module, m in adapter.modules.items():
            a_in, b_out = m.a_shape[1], m.b_shape[0]
            first = shapes.setdefault(module, (name, a_in, b_out))
            if (first[1], first[2]) != (a_in, b_out):
                raise AdapterError(f"adapters {first[0]!r} and {name!r}: module {module!r} has "
                                   f"in/out features {first[1:]} vs {(a_in, b_out)} (different "
                                   "base models?)")
    if combination_type in LINEAR_FAMILY and len(names) > 1:
        ranks = {n: _max_rank(a.config) for n, a in adapters.items()}
        if len(set(ranks.values())) > 1:
            raise AdapterError(f"combination_type {combination_type!r} needs every adapter to "
                               f"have the same rank r; found {ranks} (use cat or svd)")


def _max_rank(config: LoraConfig) -> int:
    return max([config.r, *config.rank_pattern.values()])


def _union_targets(configs: list[LoraConfig]) -> list[str] | str:
    targets = [c.target_modules for c in configs]
    kinds = {isinstance(t, str) for t in targets}
    if len(kinds) > 1 or None in targets:
        raise AdapterError("cannot combine adapters whose target_modules mix lists and regex "
                           f"strings (or are unset): {targets}")
    if isinstance(targets[0], str):
        return "|".join(f"({t})" for t in targets)
    return sorted(set().union(*targets))


def combine_adapters(adapters: dict[str, PeftAdapter], weights: Sequence[float],
                     combination_type: str = "svd", svd_rank: int | None = None,
                     svd_clamp: float | None = None, svd_full_matrices: bool = True,
                     density: float | None = None, majority_sign_method: str = "total",
                     module_order: Sequence[str] | None = None
                     ) -> tuple[LoraConfig, dict[str, torch.Tensor]]:
    """Combine parsed adapters {name: PeftAdapter} with `weights` -> (config, PEFT-keyed tensors).
    module_order: the order modules are visited (the model's; it matters for DARE's random masks
    only), default a natural sort of the module names (layers.2 before layers.10)."""
    weights = list(weights)
    config = combined_config(adapters, weights, combination_type, svd_rank, density,
                             majority_sign_method)
    combination_type = "linear" if len(adapters) == 1 else combination_type  # PEFT: scale only
    rank = config.r
    modules = set().union(*(a.modules for a in adapters.values()))
    order = [m for m in (module_order or []) if m in modules]
    order += sorted(modules - set(order), key=_natural)
    tensors: dict[str, torch.Tensor] = {}
    for module in order:
        parts = [(a.modules[module], w) for a, w in zip(adapters.values(), weights)
                 if module in a.modules]
        parts = [(dataclasses.replace(m, A=m.A.float() if m.A.dtype != torch.float64 else m.A,
                                      B=m.B.float() if m.B.dtype != torch.float64 else m.B), w)
                 for m, w in parts]
        A, B = combine_module(parts, combination_type, rank, density, majority_sign_method,
                              svd_clamp, svd_full_matrices)
        if parts[0][0].embedding:
            tensors[f"{PREFIX}{module}.lora_embedding_A"] = A
            tensors[f"{PREFIX}{module}.lora_embedding_B"] = B
        else:
            tensors[f"{PREFIX}{module}.lora_A.weight"] = A
            tensors[f"{PREFIX}{module}.lora_B.weight"] = B
    return config, tensors


def combined_config(adapters: dict[str, PeftAdapter], weights: Sequence[float],
                    combination_type: str = "svd", svd_rank: int | None = None,
                    density: float | None = None, majority_sign_method: str = "total"
                    ) -> LoraConfig:
    """The config of the combined adapter (checks the inputs first): PEFT's (the first adapter's
    config with r = lora_alpha = the new rank, no patterns, the union of the targets); rsLoRA
    off, so the scaling is 1 as the combined tensors assume."""
    _check(adapters, list(weights), combination_type, density, majority_sign_method)
    if len(adapters) == 1:
        combination_type = "linear"
    configs = [a.config for a in adapters.values()]
    ranks = [_max_rank(c) for c in configs]
    if combination_type in LINEAR_FAMILY:
        rank = ranks[0]
    elif combination_type == "cat":
        rank = sum(ranks)
    else:
        if svd_rank is not None and (isinstance(svd_rank, bool) or not isinstance(svd_rank, int)
                                     or svd_rank <= 0):
            raise ConfigError(f"svd_rank: expected a positive integer, found {svd_rank!r}")
        rank = svd_rank or max(ranks)
    return dataclasses.replace(configs[0], r=rank, lora_alpha=rank, rank_pattern={},
                               alpha_pattern={}, target_modules=_union_targets(configs),
                               use_rslora=False, init_lora_weights=True)


def combine_folders(paths: dict[str, str | Path], weights: Sequence[float], out: str | Path,
                    combination_type: str = "svd", **options) -> Path:
    """Combine PEFT adapter folders {name: path} into a new PEFT folder `out` (options: those of
    `combine_adapters`)."""
    out = Path(out)
    if out.exists() and any(out.iterdir()):
        raise AdapterError(f"{out}: output folder exists and is not empty")
    adapters = {}
    for name, path in paths.items():
        try:
            adapters[name] = load_peft(path)
        except (AdapterError, ConfigError) as exc:
            raise AdapterError(f"adapter {name!r}: {exc}") from None
    config, tensors = combine_adapters(adapters, weights, combination_type, **options)
    return write_adapter(out, config, tensors)
