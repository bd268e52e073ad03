"""LoRA layers: a frozen base layer plus named low-rank adapters beside it.

    h = W0 x + scaling * B (A x),   A: [r, in], B: [out, r], scaling = alpha / r   (LoRA eq. 3)

`LoraLinear` wraps `nn.Linear`, transformers' `Conv1D` (weight stored `[in, out]`, PEFT's
`fan_in_fan_out`) and any linear-like module with `in_features`/`out_features` and a `weight`
(e.g. a 4-bit linear whose `weight` property dequantizes). `LoraEmbedding` wraps `nn.Embedding`.
Parameter names follow PEFT (`lora_A.<adapter>.weight`, `lora_embedding_A.<adapter>`) so that
state-dict keys map 1:1 onto PEFT's files.

A layer holds several adapters; `forward(x, lora)` picks them:
  lora=None         -> the active adapter (or the rows set by `row_adapters(model, names)`),
  lora="name"       -> that adapter for every row,
  lora=[names...]   -> one adapter name per row of x (None = the bare base for that row).
A layer that does not own a requested adapter computes the base alone (adapters may target
different modules), exactly as PEFT's mixed-batch forward does.

Size (~400 lines): the three wrapper classes PEFT defines together (a shared base, linear,
embedding, plus modules_to_save) and their math functions, which every caller reaches through
this one module; the fused training path is already apart (fused.py), as is DoRA (dora.py).
"""
from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from lorafleet.errors import AdapterError, ShapeError
from lorafleet.lora import dora, fused
from lorafleet.lora.init import init_weights
from lorafleet.models.modules import is_conv1d, linear_features


# -- the math ------------------------------------------------------------------------------------
def lora_delta(x: torch.Tensor, A: torch.Tensor, B: torch.Tensor, scaling: float) -> torch.Tensor:
    """Low-rank update of a linear layer. x: [..., in], A: [r, in], B: [out, r] -> [..., out]."""
    return F.linear(F.linear(x, A), B) * scaling


def lora_embedding_delta(ids: torch.Tensor, A: torch.Tensor, B: torch.Tensor, scaling: float,
                         padding_idx: int | None = None) -> torch.Tensor:
    """Low-rank update of an embedding. ids: [...], A: [r, vocab], B: [dim, r] -> [..., dim]."""
    return F.embedding(ids, A.T, padding_idx=padding_idx) @ B.T * scaling


def delta_weight(A: torch.Tensor, B: torch.Tensor, scaling: float) -> torch.Tensor:
    """The merged update `scaling * B A`: [out, in] (LoRA sec. 4.1: W = W0 + BA)."""
    return (B @ A) * scaling


def _param_home(module: nn.Module) -> tuple[torch.device, torch.dtype]:
    """Device and dtype for new adapter weights: those of the base's floating tensors (a 4-bit
    base keeps packed integers, so its adapters fall back to the default float dtype)."""
    tensors = list(module.parameters()) + list(module.buffers())
    device = tensors[0].device if tensors else torch.device("cpu")
    floats = [t for t in tensors if t.is_floating_point()]
    dtype = floats[0].dtype if floats else torch.get_default_dtype()
    return device, dtype


# -- shared adapter bookkeeping ------------------------------------------------------------------
class LoraLayer(nn.Module):
    """What every LoRA layer shares: adapters by name, the active one, per-row choice, merging."""

    def __init__(self, base_layer: nn.Module):
        super().__init__()
        self.base_layer = base_layer
        self.r: dict[str, int] = {}
        self.lora_alpha: dict[str, float] = {}
        self.scaling: dict[str, float] = {}
        self.active_adapter: str | None = None
        self.merged_adapters: list[str] = []
        # Per-row adapter names for models that call `module(x)` (set by `row_adapters`).
        self.row_adapters: list[str | None] | None = None
        self.disabled = False    # inside `disable_adapter()`: the base alone

    _adapter_tables: tuple[str, ...] = ()   # per-adapter ModuleDicts / ParameterDicts

    @property
    def adapter_names(self) -> list[str]:
        return list(self.r)

    def _record(self, name: str, r: int, alpha: float, scaling: float) -> None:
        if not name or "." in name:
            raise AdapterError(f"adapter name {name!r}: must be non-empty and contain no '.'")
        self.r[name], self.lora_alpha[name], self.scaling[name] = r, alpha, scaling

    def forward(self, x: torch.Tensor, lora: str | Sequence[str | None] | None = None):
        if lora is None:
            lora = self.row_adapters
        result = self.base_layer(x)
        if self.disabled:
            return result
        if lora is None or isinstance(lora, str):
            names = self.active_adapters if lora is None else [lora]
            for name in names:    # several active adapters: their updates add (as in PEFT,
                # a DoRA adapter rescales the output so far)
                if name in self.r and name not in self.merged_adapters:
                    result = result + self.update(x, name, result).to(result.dtype)
            return result
        if len(lora) != x.shape[0]:
            raise ShapeError(f"per-row adapters: expected one name per row ({x.shape[0]} rows), "
                             f"found {len(lora)} names")
        if self.merged_adapters:
            raise AdapterError(f"per-row adapters cannot be used while {self.merged_adapters} "
                               "is merged into the base weights; call unmerge() first")
        base = result
        for name in dict.fromkeys(lora):
            if name is None or name not in self.r:
                continue  # bare base for these rows, or an adapter that skips this module
            rows = torch.tensor([i for i, n in enumerate(lora) if n == name], device=x.device)
            update = self.update(x.index_select(0, rows), name,
                                 base.index_select(0, rows)).to(result.dtype)
            result = result.index_add(0, rows, update)
        return result

    @property
    def active_adapters(self) -> list[str]:
        """The active adapter(s) as a list (`set_adapter` takes one name or several)."""
        active = self.active_adapter
        if active is None:
            return []
        return [active] if isinstance(active, str) else list(active)

    def update(self, x: torch.Tensor, name: str, base_out: torch.Tensor) -> torch.Tensor:
        """What adapter `name` adds to the base output `base_out` of input x (plain LoRA: the
        low-rank delta; DoRA also rescales the base output, see LoraLinear)."""
        return self.delta(x, name)

    def delete_adapter(self, name: str) -> None:
        """Remove adapter `name` from this layer (PEFT's `delete_adapter`)."""
        if name in self.merged_adapters:
            raise AdapterError(f"cannot delete adapter {name!r}: it is merged into the base "
                               "weights; unmerge() first")
        for table in (self.r, self.lora_alpha, self.scaling, getattr(self, "initial_lora", {})):
            table.pop(name, None)
        for attr in self._adapter_tables:
            table = getattr(self, attr)
            if name in table:
                del table[name]
        if isinstance(self.active_adapter, str):
            if self.active_adapter == name:
                self.active_adapter = None
        elif self.active_adapter is not None:
            self.active_adapter = [n for n in self.active_adapter if n != name] or None

    # subclasses: delta(x, name) -> [..., out] and delta_weight(name) in the base weight's layout
    def merge(self, name: str) -> None:
        """Add adapter `name` into the base weight (refuses NaN/Inf)."""
        if name not in self.r:
            raise AdapterError(f"cannot merge adapter {name!r}: this layer has {self.adapter_names}")
        if name in self.merged_adapters:
            return
        self._add_to_base(self.delta_weight(name), f"merging adapter {name!r}")
        self.merged_adapters.append(name)

    def unmerge(self) -> None:
        """Subtract every merged adapter from the base weight, newest first."""
        while self.merged_adapters:
            name = self.merged_adapters.pop()
            self._unmerge_one(name)

    def _unmerge_one(self, name: str) -> None:
        self._add_to_base(-self.delta_weight(name), f"unmerging adapter {name!r}")

    @torch.no_grad()
    def _add_to_base(self, delta: torch.Tensor, what: str) -> None:
        base = self.base_layer
        if not torch.isfinite(delta).all():
            raise AdapterError(f"{what}: the update contains NaN/Inf; base weights left unchanged")
        if hasattr(base, "merge_delta"):
            # A quantized base merges by dequantize, add, requantize (it rounds; QLoRA note).
            base.merge_delta(delta)
            return
        weight = base.weight
        merged = weight.data + delta.to(weight.dtype)
        if not torch.isfinite(merged).all():
            raise AdapterError(f"{what}: the merged weight would contain NaN/Inf "
                               "(overflow in its dtype); base weights left unchanged")
        weight.data.copy_(merged)


class LoraLinear(LoraLayer):
    """LoRA beside a linear-like base layer (nn.Linear, Conv1D, a 4-bit linear); an adapter may
    be a DoRA one (`use_dora`: a trainable magnitude per output row, dora.py)."""

    _adapter_tables = ("lora_A", "lora_B", "lora_dropout", "lora_magnitude_vector")

    def __init__(self, base_layer: nn.Module):
        super().__init__(base_layer)
        features = linear_features(base_layer)
        if features is None:
            raise AdapterError(f"{type(base_layer).__name__} is not a linear layer "
                               "(expected in_features/out_features or a Conv1D)")
        self.in_features, self.out_features = features
        # Conv1D stores its weight [in, out]; PEFT calls this fan_in_fan_out and forces it on.
        self.fan_in_fan_out = is_conv1d(base_layer)
        self.lora_A = nn.ModuleDict()
        self.lora_B = nn.ModuleDict()
        self.lora_dropout = nn.ModuleDict()
        # DoRA: m [out] per adapter (PEFT's name); the norm each merged DoRA adapter used.
        self.lora_magnitude_vector = nn.ParameterDict()
        self._dora_norm: dict[str, torch.Tensor] = {}
        # (A0, B0) of adapters whose init rewrote the base (PiSSA, OLoRA, LoftQ): saving them
        # as a plain LoRA over the original base needs them (lora/init.py convert_to_lora).
        self.initial_lora: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}

    def forward(self, x: torch.Tensor, lora: str | Sequence[str | None] | None = None):
        name = self._single_adapter(lora)
        if name is not None:
            A, B = self.lora_A[name].weight, self.lora_B[name].weight
            if fused.can_fuse(self.base_layer, x, A, B):
                return fused.lora_linear(x, self.base_layer, A, B, self.scaling[name],
                                         self.lora_dropout[name])
        return super().forward(x, lora)

    def _single_adapter(self, lora) -> str | None:
        """The one plain-LoRA adapter this call applies to every row, if that is the case (the
        fused path's case: training one adapter); else None (the general path)."""
        if lora is None:
            lora = self.row_adapters
        if self.disabled or self.merged_adapters or not (lora is None or isinstance(lora, str)):
            return None
        names = self.active_adapters if lora is None else [lora]
        if len(names) != 1 or names[0] not in self.r or self.is_dora(names[0]):
            return None
        return names[0]

    def add_adapter(self, name: str, r: int, alpha: float, scaling: float, dropout: float = 0.0,
                    init: bool | str = True, use_dora: bool = False) -> None:
        self._record(name, r, alpha, scaling)
        device, dtype = _param_home(self.base_layer)
        self.lora_A[name] = nn.Linear(self.in_features, r, bias=False, device=device, dtype=dtype)
        self.lora_B[name] = nn.Linear(r, self.out_features, bias=False, device=device, dtype=dtype)
        self.lora_dropout[name] = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.reset_adapter(name, init)
        if use_dora:
            self.init_magnitude(name)

    def base_weight(self) -> torch.Tensor:
        """The base weight as [out, in] (a 4-bit base dequantizes; Conv1D is transposed)."""
        weight = self.base_layer.weight
        return weight.T if self.fan_in_fan_out else weight

    def _lora_weight(self, name: str) -> torch.Tensor:
        """s B A as [out, in]."""
        return delta_weight(self.lora_A[name].weight, self.lora_B[name].weight, self.scaling[name])

    @torch.no_grad()
    def init_magnitude(self, name: str) -> None:
        """DoRA's m = ||W0 + s B A||_row (PEFT's init), so the layer starts where LoRA would."""
        A = self.lora_A[name].weight
        weight = self.base_weight().to(A.dtype)
        self.lora_magnitude_vector[name] = nn.Parameter(
            dora.weight_norm(weight, self._lora_weight(name).to(weight.dtype)))

    def is_dora(self, name: str) -> bool:
        return name in self.lora_magnitude_vector

    def update(self, x: torch.Tensor, name: str, base_out: torch.Tensor) -> torch.Tensor:
        if not self.is_dora(name):
            return self.delta(x, name)
        A, B = self.lora_A[name].weight, self.lora_B[name].weight
        dropout = self.lora_dropout[name]
        x = x.to(A.dtype)
        weight = self.base_weight().to(A.dtype)
        factor = dora.dora_factor(self.lora_magnitude_vector[name], weight,
                                  self._lora_weight(name).detach())
        if isinstance(dropout, nn.Identity) or not self.training:
            bias = getattr(self.base_layer, "bias", None)
            base_out = base_out.to(A.dtype)
            base_out = base_out - bias.to(A.dtype) if bias is not None else base_out
        else:   # the dropped-out input goes through the base too (PEFT)
            x = dropout(x)
            base_out = F.linear(x, weight)
        return dora.dora_update(base_out, lora_delta(x, A, B, self.scaling[name]), factor)

    def merge(self, name: str) -> None:
        if not self.is_dora(name) or name in self.merged_adapters:
            return super().merge(name)
        if name not in self.r:
            raise AdapterError(f"cannot merge adapter {name!r}: this layer has {self.adapter_names}")
        weight = self.base_weight()
        new, norm = dora.merged_weight(weight, self._lora_weight(name).to(weight.dtype),
                                       self.lora_magnitude_vector[name])
        self._dora_norm[name] = norm
        self._set_base(new, weight, f"merging DoRA adapter {name!r}")
        self.merged_adapters.append(name)

    def _unmerge_one(self, name: str) -> None:
        if not self.is_dora(name):
            return super()._unmerge_one(name)
        weight = self.base_weight()
        new = dora.unmerged_weight(weight, self._lora_weight(name), self.lora_magnitude_vector[name],
                                   self._dora_norm.pop(name))
        self._set_base(new, weight, f"unmerging DoRA adapter {name!r}")

    def _set_base(self, new: torch.Tensor, old: torch.Tensor, what: str) -> None:
        """Replace the base weight by `new` ([out, in]) through `_add_to_base` (its checks, and
        a 4-bit base's requantization)."""
        delta = (new - old.float()).detach()
        self._add_to_base(delta.T if self.fan_in_fan_out else delta, what)

    @torch.no_grad()
    def reset_adapter(self, name: str, init: bool | str = True) -> None:
        """PEFT's init: A kaiming-uniform(a=sqrt(5)) (True) or N(0, 1/r) ("gaussian"), B zero, so
        the adapted model starts equal to the base; False keeps nn.Linear's random init for both
        (useful in tests: a non-zero update)."""
        if init is False:
            return
        if init_weights(self, name, init):   # pissa / olora: they rewrite the base too
            return
        A = self.lora_A[name].weight
        if isinstance(init, str) and init.lower() == "gaussian":
            nn.init.normal_(A, std=1 / self.r[name])
        else:
            nn.init.kaiming_uniform_(A, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B[name].weight)

    def delta(self, x: torch.Tensor, name: str) -> torch.Tensor:
        A = self.lora_A[name].weight
        x = self.lora_dropout[name](x.to(A.dtype))
        return lora_delta(x, A, self.lora_B[name].weight, self.scaling[name])

    def delta_weight(self, name: str) -> torch.Tensor:
        """s B A in the base weight's layout (for DoRA: the low-rank part only; `merge` applies
        the magnitude)."""
        delta = self._lora_weight(name)
        return delta.T if self.fan_in_fan_out else delta

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, r={self.r}"


class LoraEmbedding(LoraLayer):
    """LoRA beside an nn.Embedding: A: [r, vocab], B: [dim, r] (PEFT's `lora_embedding_A/B`)."""

    _adapter_tables = ("lora_embedding_A", "lora_embedding_B")

    def __init__(self, base_layer: nn.Embedding):
        super().__init__(base_layer)
        if not isinstance(base_layer, nn.Embedding):
            raise AdapterError(f"{type(base_layer).__name__} is not an nn.Embedding")
        self.num_embeddings, self.embedding_dim = base_layer.num_embeddings, base_layer.embedding_dim
        self.lora_embedding_A = nn.ParameterDict()
        self.lora_embedding_B = nn.ParameterDict()

    def add_adapter(self, name: str, r: int, alpha: float, scaling: float, dropout: float = 0.0,
                    init: bool | str = True, use_dora: bool = False) -> None:
        if use_dora:
            raise AdapterError(f"adapter {name!r}: use_dora on an Embedding is not supported "
                               "(DoRA is supported on Linear and Conv1D layers)")
        # PEFT applies no dropout to embedding LoRA (ids cannot be dropped out).
        self._record(name, r, alpha, scaling)
        device, dtype = _param_home(self.base_layer)
        # PEFT (following loralib): A zero, B normal; init=False makes both normal.
        A = torch.randn(r, self.num_embeddings, device=device, dtype=dtype)
        B = torch.randn(self.embedding_dim, r, device=device, dtype=dtype)
        if init is not False:
            A.zero_()
        self.lora_embedding_A[name] = nn.Parameter(A)
        self.lora_embedding_B[name] = nn.Parameter(B)

    def delta(self, x: torch.Tensor, name: str) -> torch.Tensor:
        return lora_embedding_delta(x, self.lora_embedding_A[name], self.lora_embedding_B[name],
                                    self.scaling[name], self.base_layer.padding_idx)

    def delta_weight(self, name: str) -> torch.Tensor:
        # The embedding table is [vocab, dim]: the transpose of B A.
        return delta_weight(self.lora_embedding_A[name], self.lora_embedding_B[name],
                            self.scaling[name]).T


class ModulesToSave(nn.Module):
    """PEFT's `modules_to_save`: a trainable copy of a whole module per adapter (e.g. a new
    classification head); the original stays for the base model and other adapters."""

    def __init__(self, original_module: nn.Module):
        super().__init__()
        self.original_module = original_module
        self.modules_to_save = nn.ModuleDict()
        self.active_adapter: str | None = None
        self.row_adapters: list[str | None] | None = None

    def add_adapter(self, name: str) -> None:
        import copy

        self.modules_to_save[name] = copy.deepcopy(self.original_module)

    def forward(self, x: torch.Tensor, *args, **kwargs):
        rows = self.row_adapters
        if rows is None or x.ndim == 0:
            name = self.active_adapter
            module = self.modules_to_save[name] if name in self.modules_to_save else self.original_module
            return module(x, *args, **kwargs)
        if len(rows) != x.shape[0]:
            raise ShapeError(f"per-row adapters: expected one name per row ({x.shape[0]} rows), "
                             f"found {len(rows)} names")
        result = self.original_module(x, *args, **kwargs)
        for name in dict.fromkeys(rows):
            if name in self.modules_to_save:
                index = torch.tensor([i for i, n in enumerate(rows) if n == name], device=x.device)
                out = self.modules_to_save[name](x.index_select(0, index), *args, **kwargs)
                result = result.index_copy(0, index, out.to(result.dtype))
        return result
