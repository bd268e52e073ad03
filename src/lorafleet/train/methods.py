"""The fine-tuning methods: each is one small function that transforms the model and leaves
exactly the parameters it trains with requires_grad=True (STYLE.md rule 15: one trainer, many
methods). The trainer does not know which method it runs.

    lora     low-rank A, B on the target projections (LoRA paper; q,v by default)
    qlora    the base quantized to NF4, then lora (QLoRA paper)
    full     every parameter
    adapter  bottleneck adapters: a small residual MLP after attention and after the FFN
             (Houlsby et al. 2019; the LoRA paper's Adapter^H), or with --adapter-variant lin
             one per layer, after the FFN, with a LayerNorm inside (Lin et al. 2020; Adapter^L)
    prefix   learned key/value prefixes in every layer (Li & Liang 2021); --prefix-projection
             trains them through their MLP reparameterization (sec. 4.3)
    prompt   learned input embeddings prepended to the input (Lester et al. 2021)
    bitfit   biases only (Ben Zaken et al. 2021)

prefix and prompt both use "virtual tokens": the model is called with P placeholder tokens in
front of the input, and wrapped modules overwrite what those positions produce: the input
embedding (prompt) or the key and value projections of every layer (prefix). Real tokens then
attend to learned keys/values at positions 0..P-1, exactly like a P-token past_key_values in
PEFT's prefix tuning (with rotary models the learned keys are rotated to positions 0..P-1, an
invertible reparameterization of PEFT's unrotated past), and the trick works on any model whose
projections are modules (ours and transformers' alike). The placeholders' own outputs are dropped.

Artifacts: lora/qlora save a PEFT folder (adapter_config.json + adapter_model.safetensors); the
others save `trainable.safetensors` (the trained tensors by parameter name). Every artifact has a
`method.json` so `load_trained(model, dir)` can rebuild the structure and load the tensors.
"""
from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

import lorafleet
from lorafleet.errors import ConfigError, TargetError
from lorafleet.models.modules import (OUTPUT_HEAD, linear_features, linear_layer_names,
                                      modules_ending_with, replace_submodule)
# The wrapper modules live in method_layers.py; imported here for the methods and as before
# from this module (bench/efficiency.py and tests find them here).
from lorafleet.train.method_layers import (BottleneckAdapter, LinAdapter,  # noqa: F401
                                           PrefixEncoder, PrefixProjectionModel,
                                           ProjectedTokenOutput, VirtualTokenModel,
                                           VirtualTokenOutput)

logger = logging.getLogger(__name__)

METHOD_FILE = "method.json"
TRAINABLE_FILE = "trainable.safetensors"
SAVED_AS = "saved_as"  # method.json state key: "prefixes" when the prefix MLP was dropped

# --targets short names -> module-name suffixes (Llama family, GPT-2). GPT-2 fuses q, k, v into
# one c_attn, which is what PEFT adapts for "q,v" on GPT-2 too.
TARGET_ALIASES = {
    "q": ["q_proj", "attn.c_attn"], "k": ["k_proj", "attn.c_attn"], "v": ["v_proj", "attn.c_attn"],
    "o": ["o_proj", "attn.c_proj"], "gate": ["gate_proj"], "up": ["up_proj", "mlp.c_fc"],
    "down": ["down_proj", "mlp.c_proj"],
}
OUTPUT_HEADS = (OUTPUT_HEAD,)  # never adapted by all-linear (PEFT excludes the output layer too)
ADAPTER_AFTER = ("self_attn.o_proj", "attn.c_proj", "mlp.down_proj", "mlp.c_proj")
ADAPTER_AFTER_MLP = ("mlp.down_proj", "mlp.c_proj")  # Lin et al.: after the FFN only
ADAPTER_VARIANTS = ("houlsby", "lin")
KEY_VALUE = ("self_attn.k_proj", "self_attn.v_proj", "attn.c_attn")
EMBEDDINGS = ("embed_tokens", "wte")
PREFIX_INIT_STD = 0.02  # the usual transformer init scale (GPT-2's initializer_range)


METHOD_NAMES = ("lora", "qlora", "full", "adapter", "prefix", "prompt", "bitfit")


def _option(default, help: str, **argparse_kw):
    # metadata = the `lorafleet train` flag's help (the CLI builds its flags from the fields)
    return field(default=default, metadata={"help": help, "group": "method", **argparse_kw})


@dataclass
class MethodConfig:
    method: str = _option("lora", "lora, qlora (NF4 base + lora), full, adapter (bottleneck "
                          "layers), prefix, prompt, bitfit (biases only)", choices=METHOD_NAMES)
    r: int = _option(8, "LoRA rank")
    alpha: float = _option(16.0, "LoRA alpha; the update is scaled by alpha/r")
    dropout: float = _option(0.0, "LoRA dropout")
    targets: str = _option("q,v", "modules to adapt: comma-separated short names "
                           "(q,k,v,o,gate,up,down) or module names, or all-linear (q,v: the "
                           "LoRA paper's choice)")
    use_rslora: bool = _option(False, "scale the update by alpha/sqrt(r) (rsLoRA) instead of "
                               "alpha/r")
    use_dora: bool = _option(False, "DoRA: a trainable magnitude per output row beside the "
                             "low-rank direction (lora/dora.py)")
    init_lora_weights: str = _option("default", "LoRA init: default (PEFT's: A kaiming, B zero), "
                                     "gaussian, pissa, pissa_niter_N, olora; pissa/olora rewrite "
                                     "the base and the saved adapter is converted to plain LoRA "
                                     "of rank 2r over the original base")
    merge_only: bool = _option(False, "allow targets the serving engine refuses (lm_head): the "
                               "adapter is meant for `lorafleet merge`, not `serve`")
    bottleneck: int = _option(16, "adapter: hidden width of each bottleneck MLP")
    virtual_tokens: int = _option(8, "prefix / prompt: number of learned positions")
    prefix_projection: bool = _option(False, "prefix: train the prefixes through an MLP "
                                      "(embedding -> Linear -> tanh -> Linear), Li & Liang's "
                                      "reparameterization (PEFT's prefix_projection); the "
                                      "artifact keeps only the resulting prefixes")
    prefix_hidden: int = _option(512, "prefix with --prefix-projection: the MLP's hidden width "
                                 "(PEFT's encoder_hidden_size)")
    adapter_variant: str = _option("houlsby", "adapter: houlsby (after attention and after the "
                                   "FFN) or lin (one per layer after the FFN, LayerNorm inside; "
                                   "Lin et al. 2020)", choices=ADAPTER_VARIANTS)

    def __post_init__(self):
        if self.method not in METHODS:
            raise ConfigError(f"method must be one of {sorted(METHODS)} (found {self.method!r})")
        for name in ("r", "bottleneck", "virtual_tokens", "prefix_hidden"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be >= 1 (found {getattr(self, name)})")
        if self.adapter_variant not in ADAPTER_VARIANTS:
            raise ConfigError(f"adapter_variant must be one of {ADAPTER_VARIANTS} "
                              f"(found {self.adapter_variant!r})")
        from lorafleet.lora.config import INIT_METHODS, is_init_method
        if self.init_lora_weights != "default" and not is_init_method(self.init_lora_weights):
            raise ConfigError(f"init_lora_weights: expected default or one of {INIT_METHODS} "
                              f"(found {self.init_lora_weights!r})")
        if self.init_lora_weights == "loftq":
            raise ConfigError("init_lora_weights: loftq is not supported by `lorafleet train` "
                              "(it needs a quantized base and its own config); use pissa or olora")


# ---- module helpers ---------------------------------------------------------------------------

def float_like(model: nn.Module) -> dict:
    """device/dtype for new trainable tensors: those of the model's floating-point params."""
    p = next(p for p in model.parameters() if p.is_floating_point())
    return {"device": p.device, "dtype": p.dtype}


def resolve_targets(model: nn.Module, targets: str) -> list[str]:
    """--targets -> the module-name suffixes present in this model (PEFT target_modules)."""
    if targets == "all-linear":
        found = sorted({n.rpartition(".")[2] for n in linear_layer_names(model)})
    else:
        wanted = [t.strip() for t in targets.split(",") if t.strip()]
        found = []
        for t in wanted:
            present = [s for s in TARGET_ALIASES.get(t, [t]) if modules_ending_with(model, [s])]
            if not present:
                sample = linear_layer_names(model, include_lm_head=True)[:8]
                raise TargetError(f"--targets {t!r} matches no module; linear modules include "
                                  f"{sample}")
            found += [s for s in present if s not in found]
    if not found:
        raise TargetError(f"--targets {targets!r} matches no linear module")
    return found


# ---- the methods: transform the model, leave only the trained parameters trainable ------------

def apply_full(model: nn.Module, cfg: MethodConfig, state: dict) -> nn.Module:
    model.requires_grad_(True)
    return model


def check_servable(model: nn.Module, targets: list[str], merge_only: bool) -> None:
    """What `train` writes, `serve` serves: the engine applies LoRA to the decoder's projections
    only (serve/adapter_registry.py refuses the output head and embeddings), so such targets are
    refused here, before hours of training, unless the adapter is meant for merging."""
    unserved = [t for t in targets if t.rpartition(".")[2] in OUTPUT_HEADS + EMBEDDINGS]
    if not unserved:
        return
    reason = (f"--targets {','.join(unserved)}: the serving engine does not apply LoRA to the "
              f"output head or embeddings (it computes them once for every adapter)")
    if not merge_only:
        raise TargetError(reason + "; drop them, or pass --merge-only to train an adapter for "
                          "`lorafleet merge`")
    logger.warning("%s; training it anyway (--merge-only): merge it, do not serve it", reason)


def apply_lora(model: nn.Module, cfg: MethodConfig, state: dict) -> nn.Module:
    from lorafleet.lora import LoraConfig, inject_lora
    targets = state.setdefault("target_modules", resolve_targets(model, cfg.targets))
    check_servable(model, targets, cfg.merge_only)
    inject_lora(model, LoraConfig(r=cfg.r, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout,
                                  target_modules=targets, use_rslora=cfg.use_rslora,
                                  use_dora=cfg.use_dora, init_lora_weights=lora_init(cfg)))
    return model


def lora_init(cfg: MethodConfig) -> bool | str:
    """--init-lora-weights as LoraConfig takes it ("default" is PEFT's True)."""
    return True if cfg.init_lora_weights == "default" else cfg.init_lora_weights


def rewrites_base(cfg: MethodConfig) -> bool:
    """PiSSA / OLoRA move the adapter's initial part out of the base weights."""
    return cfg.init_lora_weights.startswith("pissa") or cfg.init_lora_weights == "olora"


def apply_qlora(model: nn.Module, cfg: MethodConfig, state: dict) -> nn.Module:
    quantize_base(model)
    return apply_lora(model, cfg, state)


def quantize_base(model: nn.Module) -> nn.Module:
    """NF4 base for qlora, unless it already is one (the trainer streams the checkpoint straight
    into NF4 with quant.load_quantized_model; a model passed in by the caller is swapped here)."""
    from lorafleet.quant import Linear4bit, quantize_model
    if not any(isinstance(m, Linear4bit) for m in model.modules()):
        quantize_model(model, skip=OUTPUT_HEADS)
    return model


def apply_adapter(model: nn.Module, cfg: MethodConfig, state: dict) -> nn.Module:
    after, layer = ((ADAPTER_AFTER_MLP, LinAdapter) if cfg.adapter_variant == "lin"
                    else (ADAPTER_AFTER, BottleneckAdapter))
    names = modules_ending_with(model, after)
    if not names:
        raise TargetError(f"adapter: no attention/FFN output projection ({after})")
    factory = float_like(model)
    for name in names:
        base = model.get_submodule(name)
        replace_submodule(model, name, layer(base, linear_features(base)[1], cfg.bottleneck,
                                             **factory))
    return model


def apply_prefix(model: nn.Module, cfg: MethodConfig, state: dict) -> nn.Module:
    names = modules_ending_with(model, KEY_VALUE)
    if not names:
        raise TargetError(f"prefix: no key/value projection ({KEY_VALUE}) in this model")
    factory = float_like(model)
    columns = []
    for name in names:
        out = linear_features(model.get_submodule(name))[1]
        # GPT-2's fused c_attn outputs [q | k | v]: only the k and v columns are prefixes.
        columns.append((out // 3, 2 * out // 3) if name.endswith("c_attn") else (0, out))
    if cfg.prefix_projection:
        hidden = linear_features(model.get_submodule(names[0]))[0]
        encoder = PrefixEncoder(cfg.virtual_tokens, hidden, cfg.prefix_hidden,
                                sum(width for _, width in columns), **factory)
        offset = 0
        for name, (start, width) in zip(names, columns):
            replace_submodule(model, name, ProjectedTokenOutput(
                model.get_submodule(name), encoder, offset, width, start))
            offset += width
        return PrefixProjectionModel(model, cfg.virtual_tokens, encoder)
    for name, (start, width) in zip(names, columns):
        init = torch.randn(cfg.virtual_tokens, width, **factory) * PREFIX_INIT_STD
        replace_submodule(model, name, VirtualTokenOutput(model.get_submodule(name), init, start))
    return VirtualTokenModel(model, cfg.virtual_tokens)


def apply_prompt(model: nn.Module, cfg: MethodConfig, state: dict) -> nn.Module:
    names = [n for n in modules_ending_with(model, EMBEDDINGS)
             if isinstance(model.get_submodule(n), nn.Embedding)]
    if not names:
        raise TargetError(f"prompt: no input embedding ({EMBEDDINGS}) in this model")
    embedding = model.get_submodule(names[0])
    # Lester et al. sec. 2.2: initializing from real vocabulary embeddings trains better
    # than random vectors. They draw from the 5,000 most common tokens; the model alone has no
    # token frequencies (and id order is no proxy: Llama's low ids are byte tokens), so draw
    # uniformly from the vocabulary less the special tokens the config names (BOS/EOS/PAD),
    # whose embeddings carry control meaning rather than text.
    special = special_token_ids(model)
    allowed = torch.tensor([i for i in range(embedding.num_embeddings) if i not in special])
    rows = allowed[torch.randint(0, len(allowed), (cfg.virtual_tokens,),
                                 generator=torch.Generator().manual_seed(0))]
    init = embedding.weight.detach()[rows].clone().float().to(**float_like(model))
    replace_submodule(model, names[0], VirtualTokenOutput(embedding, init))
    return VirtualTokenModel(model, cfg.virtual_tokens)


def special_token_ids(model: nn.Module) -> set[int]:
    """BOS/EOS/PAD ids named by the model's config (ours and transformers' use the same keys)."""
    config = getattr(model, "config", None)
    ids: set[int] = set()
    for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
        value = getattr(config, key, None)
        ids.update(v for v in (value if isinstance(value, (list, tuple)) else [value])
                   if isinstance(v, int))
    return ids


def apply_bitfit(model: nn.Module, cfg: MethodConfig, state: dict) -> nn.Module:
    """Train every bias. Linear layers without one (all of Llama's) get a zero bias first, so
    the model is unchanged at step 0; the output head gets none. Norm layers without a bias
    (RMSNorm) stay as they are."""
    factory = float_like(model)
    added = state.setdefault("added_bias", [
        n for n, m in model.named_modules() if isinstance(m, nn.Linear) and m.bias is None
        and n.rpartition(".")[2] not in OUTPUT_HEADS])
    for name in added:
        module = model.get_submodule(name)
        module.bias = nn.Parameter(torch.zeros(module.out_features, **factory))
    for module in model.modules():
        if isinstance(getattr(module, "bias", None), nn.Parameter):
            module.bias.requires_grad_(True)
    return model


METHODS = dict(zip(METHOD_NAMES, (apply_lora, apply_qlora, apply_full, apply_adapter,
                                   apply_prefix, apply_prompt, apply_bitfit)))


def apply_method(model: nn.Module, cfg: MethodConfig, state: dict | None = None) -> nn.Module:
    """Freeze `model`, apply the method; returns the module to train (it may wrap `model`).
    `state` records choices (resolved targets, added biases) so loading repeats them exactly."""
    state = {} if state is None else state
    model.requires_grad_(False)
    trained = METHODS[cfg.method](model, cfg, state)
    if not any(p.requires_grad for p in trained.parameters()):
        raise ConfigError(f"method {cfg.method!r} left no trainable parameter in this model")
    return trained


def trainable_state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {name: p.detach() for name, p in model.named_parameters() if p.requires_grad}


def save_trained(model: nn.Module, cfg: MethodConfig, state: dict, path: str | Path) -> None:
    """Write the method's artifact to the folder `path` (see module docstring)."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    if cfg.method in ("lora", "qlora"):
        # Through the public API, not lorafleet.adapters: train sits left of adapters in the
        # pipeline (STYLE.md rule 1), and the top level is what users call too.
        # A PiSSA / OLoRA adapter only fits its rewritten base: save the equal plain LoRA over
        # the original base, which is what `serve` and PEFT load.
        lorafleet.save_adapter(model, path, convert_to_lora=rewrites_base(cfg))
    elif isinstance(model, PrefixProjectionModel):
        # Li & Liang drop the MLP after training and keep only the prefixes it produces: the
        # artifact is plain prefix tuning's (P * layers * 2 * kv_width numbers, against the
        # MLP's hidden * encoder_hidden + encoder_hidden * layers * 2 * kv_width), and
        # inference skips the MLP. Resuming training needs the MLP: the trainer's checkpoints
        # hold every trainable tensor (trainable_state), not this artifact.
        prefixes = {f"{name}.virtual": module.learned().detach().contiguous()
                    for name, module in model.named_modules()
                    if isinstance(module, ProjectedTokenOutput)}
        save_file(prefixes, str(path / TRAINABLE_FILE))
        state = {**state, SAVED_AS: "prefixes"}
    else:
        save_file(_unshared(trainable_state(model)), str(path / TRAINABLE_FILE))
    (path / METHOD_FILE).write_text(json.dumps({**asdict(cfg), "state": state}, indent=2))


def _unshared(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Contiguous tensors, none sharing storage (safetensors refuses tied weights): a copy
    only of those that need one, since for full fine-tuning this is the whole model."""
    seen: set[int] = set()
    out = {}
    for name, tensor in tensors.items():
        tensor = tensor.contiguous()
        if tensor.untyped_storage().data_ptr() in seen or tensor.numel() != \
                tensor.untyped_storage().nbytes() // tensor.element_size():
            tensor = tensor.clone()
        seen.add(tensor.untyped_storage().data_ptr())
        out[name] = tensor
    return out


def load_trained(model: nn.Module, path: str | Path) -> nn.Module:
    """Apply the saved method to a fresh base `model` and load the trained tensors; returns the
    module to call (input_ids -> logits)."""
    path = Path(path)
    if not (path / METHOD_FILE).is_file():
        raise ConfigError(f"{path}: no {METHOD_FILE}; not a lorafleet training artifact")
    saved = json.loads((path / METHOD_FILE).read_text())
    state = saved.pop("state", {})
    cfg = MethodConfig(**saved)
    if cfg.method in ("lora", "qlora"):
        if cfg.method == "qlora":
            quantize_base(model)
        lorafleet.load_adapter(model, path, adapter_name="default")
        return model
    if state.get(SAVED_AS) == "prefixes":   # a projected prefix saved as its prefixes
        cfg = replace(cfg, prefix_projection=False)
    trained = apply_method(model, cfg, state)
    tensors = load_file(str(path / TRAINABLE_FILE))
    expected = set(trainable_state(trained))
    if set(tensors) != expected:
        missing, extra = sorted(expected - set(tensors)), sorted(set(tensors) - expected)
        raise ConfigError(f"{path / TRAINABLE_FILE}: tensors do not fit the model "
                          f"(missing {missing[:3]}, unexpected {extra[:3]})")
    trained.load_state_dict(tensors, strict=False)
    return trained
