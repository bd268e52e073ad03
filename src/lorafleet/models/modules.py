"""What a projection is, for every stage that looks for one (LoRA targets, QLoRA's swap, the
training methods, the serving runner's shells): one answer, here in the leftmost stage.

A *projection* is a linear layer `y = x W^T + b`:
- `nn.Linear` (and its subclasses, e.g. bitsandbytes' Linear4bit);
- GPT-2's `Conv1D` (ours in gpt2.py, or transformers'), which stores W as `[in, out]` (PEFT's
  `fan_in_fan_out`), recognised by transformers' interface (`nf` out, `nx` in features) so
  that transformers need not be imported;
- a linear layer of a later stage that declares itself one with the class attribute
  `linear_projection = True` (quant's NF4 `Linear4bit`). models sits left of quant (STYLE.md
  rule 1), so it cannot import that class; a declared attribute, unlike matching the class
  name as a string, survives a rename and admits a second quantized format without a change
  here.
"""
from __future__ import annotations

import contextlib
from collections.abc import Iterable, Sequence

import torch
from torch import nn

# The class attribute by which a projection defined in a later stage declares itself.
PROJECTION_ATTRIBUTE = "linear_projection"
OUTPUT_HEAD = "lm_head"   # transformers' name for the output projection of a causal LM


def is_conv1d(module: nn.Module) -> bool:
    """GPT-2's Conv1D (ours or transformers'): a linear layer whose weight is `[in, out]`."""
    nf, nx = getattr(module, "nf", None), getattr(module, "nx", None)
    if not (isinstance(nf, int) and isinstance(nx, int)):
        return False   # checked first: `weight` may be a property that dequantizes
    weight = getattr(module, "weight", None)
    return isinstance(weight, torch.Tensor) and tuple(weight.shape) == (nx, nf)


def is_projection(module: nn.Module) -> bool:
    """nn.Linear, a Conv1D, or a later stage's linear layer that declares itself one."""
    return (isinstance(module, nn.Linear) or is_conv1d(module)
            or getattr(type(module), PROJECTION_ATTRIBUTE, False) is True)


def linear_features(module: nn.Module) -> tuple[int, int] | None:
    """(in_features, out_features) of a linear-like module, or None if it is not one."""
    if is_conv1d(module):
        return int(module.nx), int(module.nf)
    in_features = getattr(module, "in_features", None)
    out_features = getattr(module, "out_features", None)
    if isinstance(in_features, int) and isinstance(out_features, int):
        return in_features, out_features
    return None


def output_head_names(model: nn.Module) -> set[str]:
    """The output projection(s): what `get_output_embeddings()` returns (transformers models)
    and any module named `lm_head`."""
    head = None
    get_head = getattr(model, "get_output_embeddings", None)
    if callable(get_head):
        # transformers raises NotImplementedError (or returns None) for models without a head
        with contextlib.suppress(NotImplementedError, AttributeError):
            head = get_head()
    return {name for name, module in model.named_modules()
            if (head is not None and module is head) or name.rpartition(".")[2] == OUTPUT_HEAD}


def linear_layer_names(model: nn.Module, include_lm_head: bool = False,
                       modules: Iterable[tuple[str, nn.Module]] | None = None) -> list[str]:
    """Full names of the model's projections (`model.layers.0.self_attn.q_proj`), the output
    head left out unless `include_lm_head`. Without the head this is PEFT's "all-linear" (QLoRA
    sec. 4: adapting every linear layer is needed to match full fine-tuning; PEFT leaves the
    output layer alone). `modules`: the (name, module) pairs to choose from (default: all of
    `model`'s), e.g. with wrapped projections standing for their base layer."""
    heads = set() if include_lm_head else output_head_names(model)
    pairs = model.named_modules() if modules is None else modules
    return [name for name, module in pairs
            if name and is_projection(module) and name not in heads]


def name_matches(name: str, names: Sequence[str]) -> bool:
    """PEFT's rule for a list of module names: `name` is one of them or ends with "." + one."""
    return any(name == n or name.endswith("." + n) for n in names)


def modules_ending_with(model: nn.Module, names: Sequence[str]) -> list[str]:
    """Full names of the modules that `name_matches` one of `names`."""
    return [name for name, _ in model.named_modules() if name and name_matches(name, names)]


def replace_submodule(model: nn.Module, name: str, new: nn.Module) -> None:
    """Put `new` where the submodule called `name` (a full dotted name) is."""
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, new)
