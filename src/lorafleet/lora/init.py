"""LoRA initializations that start from the base weight (PEFT's `init_lora_weights` values):

  "pissa" (Meng et al., 2404.02948): W = U S V^T; B = U_r sqrt(S_r / s), A = sqrt(S_r / s) V_r^T,
      and the base becomes the residual W_res = W - s B A (the principal part is what trains);
  "pissa_niter_N": the same from torch.svd_lowrank(W, r, niter=N) (fast, randomized);
  "olora" (Buyukakyuz, 2406.01775): W = Q R; B = Q[:, :r], A = R[:r], W_res = W - s B A.
  "loftq" lives in quant/loftq.py (it needs the NF4 quantizer, right of lora in the pipeline).

These change the base weight, so such an adapter only means something over its residual base.
`convert_to_lora` turns a trained one into a plain LoRA over the *original* base, as PEFT's
`save_pretrained(path_initial_model_for_weight_conversion=...)` does:
    W + dW = W_res + s B A = W - s B0 A0 + s B A  ->  dW = s [B | -B0] [A ; A0]
rank 2r, and alpha 2 alpha (sqrt(2) alpha with rsLoRA) so the scaling s is unchanged.
"""
from __future__ import annotations

import dataclasses
import math

import torch

from lorafleet.errors import AdapterError, ConfigError
from lorafleet.lora.config import LoraConfig
from lorafleet.lora.peft_format import PREFIX

BASE_CHANGING = ("pissa", "olora", "loftq")   # inits after which the base is a residual


def changes_base(init) -> bool:
    """Whether `init_lora_weights` rewrites the base weight (pissa*, olora, loftq)."""
    return isinstance(init, str) and init.split("_niter_")[0] in BASE_CHANGING


def _float_weight(layer) -> torch.Tensor:
    weight = layer.base_layer.weight
    if hasattr(layer.base_layer, "merge_delta") or weight.dtype not in (
            torch.float32, torch.float16, torch.bfloat16):
        raise ConfigError("init_lora_weights: PiSSA / OLoRA initialize over a float base "
                          f"(found {type(layer.base_layer).__name__}); initialize, then quantize "
                          "the residual base (or use \"loftq\" for an NF4 base)")
    return weight


@torch.no_grad()
def pissa_init(layer, name: str, method: str) -> None:
    """PiSSA on LoraLinear `layer`, adapter `name` (PEFT's `pissa_init`, same operations)."""
    weight = _float_weight(layer)
    dtype, r, scaling = weight.dtype, layer.r[name], layer.scaling[name]
    w = layer.base_weight().float()   # [out, in] (Conv1D transposed)
    if method == "pissa":
        V, S, Uh = torch.linalg.svd(w, full_matrices=False)
        Vr, Sr, Uhr = V[:, :r], S[:r] / scaling, Uh[:r]
    else:
        Vr, Sr, Ur = torch.svd_lowrank(w, r, niter=int(method.split("_niter_")[-1]))
        Sr, Uhr = Sr / scaling, Ur.t()
    A = torch.diag(torch.sqrt(Sr)) @ Uhr
    B = Vr @ torch.diag(torch.sqrt(Sr))
    _set(layer, name, A, B, w - scaling * B @ A, dtype)


@torch.no_grad()
def olora_init(layer, name: str) -> None:
    """OLoRA on LoraLinear `layer`, adapter `name` (PEFT's `olora_init`)."""
    weight = _float_weight(layer)
    dtype, r, scaling = weight.dtype, layer.r[name], layer.scaling[name]
    w = layer.base_weight().float()   # [out, in] (Conv1D transposed)
    Q, R = torch.linalg.qr(w)
    A, B = R[:r].contiguous(), Q[:, :r].contiguous()
    _set(layer, name, A, B, w - scaling * B @ A, dtype)


def _set(layer, name: str, A: torch.Tensor, B: torch.Tensor, residual: torch.Tensor,
         dtype: torch.dtype) -> None:
    layer.lora_A[name].weight.data = A.to(layer.lora_A[name].weight.dtype)
    layer.lora_B[name].weight.data = B.to(layer.lora_B[name].weight.dtype)
    residual = residual.T if layer.fan_in_fan_out else residual
    layer.base_layer.weight.data = residual.to(dtype).contiguous()
    # what convert_to_lora subtracts later (the trained A, B move away from these)
    layer.initial_lora[name] = (layer.lora_A[name].weight.detach().clone(),
                                layer.lora_B[name].weight.detach().clone())


def init_weights(layer, name: str, init) -> bool:
    """Run a base-changing init on LoraLinear `layer`; False when `init` is not one of them."""
    if not isinstance(init, str):
        return False
    if init == "pissa" or init.startswith("pissa_niter_"):
        pissa_init(layer, name, init)
        return True
    if init == "olora":
        olora_init(layer, name)
        return True
    if init == "loftq":
        raise ConfigError("init_lora_weights=\"loftq\": use lorafleet.quant.loftq.loftq_model "
                          "(it quantizes the base to NF4 and folds the error into A and B)")
    return False


# -- conversion to a plain LoRA over the original base -------------------------------------------
def convert_to_lora(config: LoraConfig, tensors: dict[str, torch.Tensor],
                    initial: dict[str, torch.Tensor]) -> tuple[LoraConfig, dict[str, torch.Tensor]]:
    """A trained PiSSA / OLoRA / LoftQ adapter (PEFT-keyed `tensors`) and its initial A0, B0
    (`initial`, same keys) -> (config, tensors) of the equal plain LoRA over the original base:
    A' = [A ; A0], B' = [B | -B0], r and alpha doubled (PEFT's conversion)."""
    out = {}
    for key, tensor in tensors.items():
        if ".lora_A" in key or ".lora_B" in key or ".lora_embedding_" in key:
            if key not in initial:
                raise AdapterError(f"convert_to_lora: the initial adapter lacks {key!r} (is it "
                                   "the same adapter before training?)")
            start = initial[key].to(tensor.dtype)
            if start.shape != tensor.shape:
                raise AdapterError(f"convert_to_lora: {key}: initial shape {list(start.shape)} "
                                   f"differs from the trained {list(tensor.shape)}")
            is_a = ".lora_A" in key or ".lora_embedding_A" in key
            out[key] = torch.cat([tensor, start], 0) if is_a else torch.cat([tensor, -start], 1)
        elif key.endswith(".lora_magnitude_vector"):
            raise AdapterError(f"convert_to_lora: {key}: a DoRA adapter cannot be converted")
        else:
            out[key] = tensor
    alpha = config.lora_alpha * (math.sqrt(2) if config.use_rslora else 2)
    converted = dataclasses.replace(
        config, init_lora_weights=True, r=config.r * 2, lora_alpha=alpha,
        rank_pattern={k: 2 * v for k, v in config.rank_pattern.items()},
        alpha_pattern={k: 2 * v for k, v in config.alpha_pattern.items()})
    return converted, out


def initial_tensors(model, adapter_name: str = "default") -> dict[str, torch.Tensor]:
    """PEFT-keyed A0 / B0 that a base-changing init gave adapter `adapter_name` of `model`."""
    out = {}
    for module_name, module in model.named_modules():
        start = getattr(module, "initial_lora", {}).get(adapter_name)
        if start is not None:
            out[f"{PREFIX}{module_name}.lora_A.weight"] = start[0]
            out[f"{PREFIX}{module_name}.lora_B.weight"] = start[1]
    return out
