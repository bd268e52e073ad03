"""`ModelConfig`: the one description of a decoder we build, read from a Hugging Face config.json.

Two families share it: the Llama family (Llama 2/3, Mistral, Qwen2: RMSNorm, RoPE, gated MLP,
grouped-query attention) and GPT-2 (LayerNorm, learned positions, Conv1D projections).
Both transformers v4 keys (`rope_theta`, `rope_scaling`) and v5 keys (`rope_parameters`) are read.
Mistral's / Qwen2's sliding window is ignored: it only changes attention for sequences longer
than the window (4096+ tokens), which our tests and demos never reach; it is logged when set.
"""
from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lorafleet.errors import ConfigError, LoraFleetError, ModelLoadError

log = logging.getLogger(__name__)

# Hugging Face architecture name -> our family.
ARCHITECTURES = {
    "LlamaForCausalLM": "llama",
    "MistralForCausalLM": "llama",
    "Qwen2ForCausalLM": "llama",
    "GPT2LMHeadModel": "gpt2",
}
MODEL_TYPES = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM",
               "qwen2": "Qwen2ForCausalLM", "gpt2": "GPT2LMHeadModel"}
ROPE_TYPES = ("default", "linear", "llama3")


def read_json(file: Path, error: type[LoraFleetError] = ConfigError) -> Any:
    """The value in a JSON file (config.json, adapter_config.json, ...); `error` naming the file,
    and the line of a syntax error, otherwise."""
    try:
        return json.loads(file.read_text())
    except json.JSONDecodeError as exc:
        raise error(f"{file}: invalid JSON at line {exc.lineno}: {exc.msg}") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise error(f"{file}: not readable ({exc})") from None


@dataclass
class ModelConfig:
    architecture: str = "LlamaForCausalLM"
    vocab_size: int = 32000
    hidden_size: int = 4096
    intermediate_size: int = 11008
    num_hidden_layers: int = 32
    num_attention_heads: int = 32
    num_key_value_heads: int = 32
    head_dim: int = 0  # 0: hidden_size // num_attention_heads
    max_position_embeddings: int = 2048
    norm_eps: float = 1e-6
    hidden_act: str = "silu"
    tie_word_embeddings: bool = False
    qkv_bias: bool = False  # Qwen2: True; Llama: attention_bias
    o_bias: bool = False  # Llama attention_bias also biases o_proj; Qwen2 does not
    mlp_bias: bool = False
    rope_theta: float = 10000.0
    # {"rope_type": "llama3", "factor":..., "low_freq_factor":..., "high_freq_factor":...,
    #  "original_max_position_embeddings":...}, {"rope_type": "linear", "factor": ...} or None
    rope_scaling: dict[str, Any] | None = None
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None
    # GPT-2 only
    scale_attn_weights: bool = True
    scale_attn_by_inverse_layer_idx: bool = False
    extra: dict[str, Any] = field(default_factory=dict, repr=False)

    def __post_init__(self):
        if self.architecture not in ARCHITECTURES:
            raise ModelLoadError(
                f"unsupported architecture {self.architecture!r}; supported: "
                f"{', '.join(ARCHITECTURES)}")
        for name in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
                     "num_key_value_heads"):
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise ConfigError(f"config field {name} must be a positive integer, got "
                                  f"{value!r}")
        if not self.head_dim:
            if self.hidden_size % self.num_attention_heads:
                raise ConfigError(
                    f"hidden_size {self.hidden_size} is not divisible by num_attention_heads "
                    f"{self.num_attention_heads} and config has no head_dim")
            self.head_dim = self.hidden_size // self.num_attention_heads
        if self.num_attention_heads % self.num_key_value_heads:
            raise ConfigError(
                f"num_attention_heads {self.num_attention_heads} is not a multiple of "
                f"num_key_value_heads {self.num_key_value_heads}")
        if self.rope_scaling is not None:
            rope_type = self.rope_scaling.get("rope_type", self.rope_scaling.get("type"))
            if rope_type not in ROPE_TYPES:
                raise ConfigError(f"rope_scaling type {rope_type!r} is not supported; "
                                  f"supported: {', '.join(ROPE_TYPES)}")
            self.rope_scaling = {**self.rope_scaling, "rope_type": rope_type}
            if rope_type == "default":
                self.rope_scaling = None

    @property
    def family(self) -> str:
        return ARCHITECTURES[self.architecture]

    @classmethod
    def from_hf(cls, path: str | Path) -> "ModelConfig":
        """Read a checkpoint folder's config.json (or the file itself)."""
        path = Path(path)
        file = path / "config.json" if path.is_dir() else path
        if not file.is_file():
            raise ModelLoadError(f"no config.json in {path}")
        return cls.from_dict(read_json(file, ModelLoadError), source=str(file))

    @classmethod
    def from_dict(cls, raw: dict[str, Any], source: str = "config") -> "ModelConfig":
        architectures = raw.get("architectures") or []
        arch = next((a for a in architectures if a in ARCHITECTURES), None)
        if arch is None and not architectures:
            arch = MODEL_TYPES.get(raw.get("model_type", ""))
        if arch is None:
            found = architectures or raw.get("model_type")
            raise ModelLoadError(f"{source}: unsupported architecture {found!r}; supported: "
                                 f"{', '.join(ARCHITECTURES)}")
        try:
            if ARCHITECTURES[arch] == "gpt2":
                return cls._gpt2(arch, raw)
            return cls._llama(arch, raw, source)
        except KeyError as exc:
            raise ModelLoadError(f"{source}: missing field {exc.args[0]!r}") from exc

    @classmethod
    def _llama(cls, arch: str, raw: dict[str, Any], source: str) -> "ModelConfig":
        # v5 keeps theta and scaling together in rope_parameters; v4 has rope_theta/rope_scaling.
        rope = dict(raw.get("rope_parameters") or {})
        theta = rope.pop("rope_theta", raw.get("rope_theta", 10000.0))
        scaling = rope or raw.get("rope_scaling")
        if raw.get("sliding_window") and raw.get("use_sliding_window", True):
            log.info("%s: sliding_window=%s ignored (full attention is used)", source,
                     raw["sliding_window"])
        heads = raw["num_attention_heads"]
        is_qwen2 = arch == "Qwen2ForCausalLM"
        attention_bias = bool(raw.get("attention_bias", False))
        return cls(
            architecture=arch,
            vocab_size=raw["vocab_size"],
            hidden_size=raw["hidden_size"],
            intermediate_size=raw["intermediate_size"],
            num_hidden_layers=raw["num_hidden_layers"],
            num_attention_heads=heads,
            num_key_value_heads=raw.get("num_key_value_heads") or heads,
            head_dim=raw.get("head_dim") or 0,
            max_position_embeddings=raw.get("max_position_embeddings", 2048),
            norm_eps=raw.get("rms_norm_eps", 1e-6),
            hidden_act=raw.get("hidden_act", "silu"),
            tie_word_embeddings=raw.get("tie_word_embeddings", False),
            qkv_bias=is_qwen2 or attention_bias,
            o_bias=attention_bias and not is_qwen2,
            mlp_bias=bool(raw.get("mlp_bias", False)),
            rope_theta=float(theta),
            rope_scaling=scaling or None,
            bos_token_id=raw.get("bos_token_id"),
            eos_token_id=raw.get("eos_token_id"),
            extra=raw,
        )

    @classmethod
    def _gpt2(cls, arch: str, raw: dict[str, Any]) -> "ModelConfig":
        hidden = raw["n_embd"]
        return cls(
            architecture=arch,
            vocab_size=raw["vocab_size"],
            hidden_size=hidden,
            intermediate_size=raw.get("n_inner") or 4 * hidden,
            num_hidden_layers=raw["n_layer"],
            num_attention_heads=raw["n_head"],
            num_key_value_heads=raw["n_head"],
            max_position_embeddings=raw.get("n_positions", 1024),
            norm_eps=raw.get("layer_norm_epsilon", 1e-5),
            hidden_act=raw.get("activation_function", "gelu_new"),
            tie_word_embeddings=raw.get("tie_word_embeddings", True),
            qkv_bias=True, o_bias=True, mlp_bias=True,
            bos_token_id=raw.get("bos_token_id"),
            eos_token_id=raw.get("eos_token_id"),
            scale_attn_weights=raw.get("scale_attn_weights", True),
            scale_attn_by_inverse_layer_idx=raw.get("scale_attn_by_inverse_layer_idx", False),
            extra=raw,
        )
