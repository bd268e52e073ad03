"""Run the sec. 7 analyses on PEFT adapter folders: per adapted module, phi grids between two
adapters, dW spectra, and amplification factors against the base weights."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch

from lorafleet.analysis.subspace import (delta_weight, own_projection_norm, projection_norm_on,
                                         random_projection_norm, singular_values,
                                         subspace_similarity_grid, top_singular_directions)
from lorafleet.errors import AdapterError, ShapeError


@dataclass
class LoraFactors:
    """One adapted module: A [r, in], B [out, r] and the scaling alpha/r (or alpha/sqrt(r))."""
    module: str
    lora_a: torch.Tensor
    lora_b: torch.Tensor
    scaling: float
    fan_in_fan_out: bool = False

    @property
    def rank(self) -> int:
        return self.lora_a.shape[0]

    def delta(self) -> torch.Tensor:
        """dW in the [out, in] orientation of nn.Linear."""
        return delta_weight(self.lora_a, self.lora_b, self.scaling)


def load_lora_factors(adapter_dir: str | Path) -> dict[str, LoraFactors]:
    """{module name (as in the base model): LoraFactors} from a PEFT adapter folder (its linear
    modules; embedding LoRA is left out), read and checked by the one PEFT reader, whose
    per-module scaling honours rank_pattern, alpha_pattern and rsLoRA."""
    from lorafleet.lora.peft_format import load_peft

    adapter = load_peft(adapter_dir)
    out = {name: LoraFactors(name, m.A.float(), m.B.float(), float(m.scaling),
                             adapter.config.fan_in_fan_out)
           for name, m in sorted(adapter.modules.items()) if not m.embedding}
    if not out:
        raise AdapterError(f"{adapter_dir}: no lora_A/lora_B weights of a linear module found")
    return out


@dataclass
class ModuleAnalysis:
    module: str
    rank: int
    singular_values: list[float]
    delta_norm: float
    amplification: float | None = None          # needs the base weights
    weight_projection_norm: float | None = None  # ||U^T W V^T||_F
    random_projection_norm: float | None = None  # the same for a random matrix of W's norm
    # the paper's Table 7 rows: W onto its own top-r directions, W onto random directions
    own_projection_norm: float | None = None
    random_directions_norm: float | None = None
    weight_norm: float | None = None


@dataclass
class PairAnalysis:
    """phi grids for the modules two adapters both adapt."""
    grids: dict[str, torch.Tensor] = field(default_factory=dict)  # module -> [r1, r2]


def analyze_adapter(factors: dict[str, LoraFactors],
                    base_weights: dict[str, torch.Tensor] | None = None,
                    seed: int = 0) -> list[ModuleAnalysis]:
    """Spectra of every dW; amplification when `base_weights` ({module: W [out, in]}) is given.
    The random-matrix baseline is the paper's Table 7 comparison row."""
    gen = torch.Generator().manual_seed(seed)
    results = []
    for name, f in factors.items():
        dw = f.delta()
        entry = ModuleAnalysis(name, f.rank, singular_values(dw)[:f.rank].tolist(),
                               float(torch.linalg.matrix_norm(dw)))
        if base_weights is not None and name in base_weights:
            w = base_weights[name].double()
            if w.shape != dw.shape:
                raise ShapeError(f"{name}: W {tuple(w.shape)} and dW {tuple(dw.shape)} differ in "
                                 "shape")
            # dW's top-r directions, one SVD for the three rows that project onto them
            # (amplification_factor and projection_norm would each take it again)
            u, vh = top_singular_directions(dw, f.rank)
            entry.weight_projection_norm = projection_norm_on(w, u, vh)
            entry.amplification = (float(torch.linalg.matrix_norm(dw.double()))
                                   / entry.weight_projection_norm)
            rand = torch.randn(w.shape, generator=gen, dtype=torch.float64)
            rand *= torch.linalg.matrix_norm(w) / torch.linalg.matrix_norm(rand)
            entry.random_projection_norm = projection_norm_on(rand, u, vh)
            entry.own_projection_norm = own_projection_norm(w, f.rank)
            entry.random_directions_norm = random_projection_norm(w, f.rank, gen)
            entry.weight_norm = float(torch.linalg.matrix_norm(w))
        results.append(entry)
    return results


def compare_adapters(first: dict[str, LoraFactors], second: dict[str, LoraFactors]) -> PairAnalysis:
    common = sorted(set(first) & set(second))
    if not common:
        raise AdapterError("the two adapters share no adapted module; phi needs the same base "
                           f"modules (first has {sorted(first)[:3]}, second {sorted(second)[:3]})")
    pair = PairAnalysis()
    for name in common:
        pair.grids[name] = subspace_similarity_grid(first[name].lora_a, second[name].lora_a)
    return pair


def base_weights_for(model: torch.nn.Module, factors: dict[str, LoraFactors]) -> dict[str, torch.Tensor]:
    """{module: W [out, in]} from a loaded base model, for the modules an adapter adapts."""
    weights = {}
    for name, f in factors.items():
        try:
            module = model.get_submodule(name)
        except AttributeError:
            raise AdapterError(f"adapter module {name!r} is not in the base model") from None
        w = module.weight.detach()
        weights[name] = w.T if f.fan_in_fan_out else w  # GPT-2 Conv1D keeps W as [in, out]
    return weights
