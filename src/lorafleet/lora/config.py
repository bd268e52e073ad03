"""`LoraConfig`: what to adapt and how, with the field names of PEFT's `adapter_config.json`.

The config is the one thing a PEFT adapter folder and a lorafleet run share, so the names,
defaults and meanings are PEFT's (peft 0.21 `LoraConfig`); the LoRA variant the LoRA paper
describes, rsLoRA, DoRA (`use_dora`) and the initializations of `INIT_METHODS` are supported;
PEFT options that would change the math (DoRA, LoRA
bias, layer replication...) are refused rather than silently ignored.
"""
from __future__ import annotations

import logging
import math
import re
import warnings
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from lorafleet.errors import AdapterError, ConfigError
from lorafleet.models.config import read_json

log = logging.getLogger(__name__)

CONFIG_NAME = "adapter_config.json"
ALL_LINEAR = "all-linear"
BIAS_MODES = ("none", "all", "lora_only")

# PEFT keys that carry no meaning for plain LoRA inference/training here: accepted silently.
_IGNORED_PEFT_KEYS = {
    "peft_type", "peft_version", "inference_mode", "auto_mapping", "revision", "loftq_config",
    "megatron_config", "megatron_core", "eva_config", "corda_config", "qalora_group_size",
    "use_qalora", "target_parameters", "layer_replication", "trainable_token_indices",
    "alora_invocation_tokens", "arrow_config", "ensure_weight_tying", "lora_ga_config",
    "monteclora_config", "kasa_config", "velora_config", "use_bdlora", "lora_bias",
    "modules_to_tie",
}
# PEFT options that change the forward math; a non-default value cannot be honoured.
_UNSUPPORTED_IF_SET = {
    "lora_bias": False, "layer_replication": None, "target_parameters": None,
    "trainable_token_indices": None, "use_qalora": False, "alora_invocation_tokens": None,
    "arrow_config": None, "use_bdlora": None,
}


@dataclass
class LoraConfig:
    """LoRA hyper-parameters (PEFT names and defaults).

    target_modules: a list of module-name suffixes (`["q_proj", "v_proj"]`), a regex that must
      match the full module name, `"all-linear"` (every Linear/Conv1D except the output head),
      or None (the usual defaults for known architectures).
    rank_pattern / alpha_pattern: `{pattern: value}` overriding `r` / `lora_alpha` for modules
      whose full name ends with a match of `pattern` (PEFT's `get_pattern_key`).
    """

    r: int = 8
    lora_alpha: float = 8
    lora_dropout: float = 0.0
    target_modules: list[str] | str | None = None
    exclude_modules: list[str] | str | None = None
    layers_to_transform: list[int] | int | None = None
    layers_pattern: list[str] | str | None = None
    rank_pattern: dict[str, int] = field(default_factory=dict)
    alpha_pattern: dict[str, float] = field(default_factory=dict)
    use_rslora: bool = False
    fan_in_fan_out: bool = False
    bias: str = "none"
    init_lora_weights: bool | str = True
    use_dora: bool = False
    modules_to_save: list[str] | None = None
    base_model_name_or_path: str | None = None
    task_type: str | None = None

    def __post_init__(self) -> None:
        _check_rank("r", self.r)
        _check_number("lora_alpha", self.lora_alpha)
        if not isinstance(self.lora_dropout, (int, float)) or not 0 <= self.lora_dropout < 1:
            raise ConfigError(f"lora_dropout: expected a float in [0, 1), found {self.lora_dropout!r}")
        self.target_modules = _names_or_regex("target_modules", self.target_modules)
        self.exclude_modules = _names_or_regex("exclude_modules", self.exclude_modules)
        if self.layers_to_transform is not None:
            layers = self.layers_to_transform
            items = [layers] if isinstance(layers, int) else layers
            if not isinstance(items, (list, tuple)) or not all(
                    isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in items):
                raise ConfigError("layers_to_transform: expected a non-negative int or a list of "
                                  f"them, found {layers!r}")
            self.layers_to_transform = layers if isinstance(layers, int) else list(layers)
        if self.layers_pattern is not None:
            pattern = self.layers_pattern
            if not (isinstance(pattern, str) or (isinstance(pattern, (list, tuple))
                                                 and all(isinstance(p, str) for p in pattern))):
                raise ConfigError(f"layers_pattern: expected a str or a list of str, found {pattern!r}")
            self.layers_pattern = pattern if isinstance(pattern, str) else list(pattern)
        for name, check in (("rank_pattern", _check_rank), ("alpha_pattern", _check_number)):
            pattern = getattr(self, name)
            if pattern is None:
                setattr(self, name, {})
                continue
            if not isinstance(pattern, dict):
                raise ConfigError(f"{name}: expected a dict {{pattern: value}}, found {pattern!r}")
            for key, value in pattern.items():
                check(f"{name}[{key!r}]", value)
        for name in ("use_rslora", "fan_in_fan_out", "use_dora"):
            if not isinstance(getattr(self, name), bool):
                raise ConfigError(f"{name}: expected true/false, found {getattr(self, name)!r}")
        if self.bias not in BIAS_MODES:
            raise ConfigError(f"bias: expected one of {BIAS_MODES}, found {self.bias!r}")
        init = self.init_lora_weights
        if not (isinstance(init, bool) or (isinstance(init, str) and is_init_method(init))):
            raise ConfigError(f"init_lora_weights: expected true, false or one of {INIT_METHODS} "
                              f"(pissa_niter_N with N > 0; other PEFT initialisations are not "
                              f"supported), found {init!r}")
        if self.modules_to_save is not None:
            if isinstance(self.modules_to_save, str) or not all(
                    isinstance(m, str) for m in self.modules_to_save):
                raise ConfigError(f"modules_to_save: expected a list of module names, found "
                                  f"{self.modules_to_save!r}")
            self.modules_to_save = list(self.modules_to_save)

    # -- rank, alpha and scaling of one module (the only place they are looked up) -------------
    def scaling(self, r: int, alpha: float) -> float:
        """alpha / r (LoRA paper sec. 4.1), or alpha / sqrt(r) with rsLoRA."""
        return alpha / math.sqrt(r) if self.use_rslora else alpha / r

    def rank_and_alpha(self, module: str) -> tuple[int, float]:
        """(r, alpha) of module `module` (its full name): `rank_pattern` / `alpha_pattern` when
        one of their keys matches, else `r` / `lora_alpha` (PEFT's `get_pattern_key`)."""
        r_key = pattern_key(self.rank_pattern, module)
        a_key = pattern_key(self.alpha_pattern, module)
        return (self.rank_pattern[r_key] if r_key is not None else self.r,
                self.alpha_pattern[a_key] if a_key is not None else self.lora_alpha)

    def module_scaling(self, module: str) -> float:
        """The factor on B A for module `module`: `scaling(*rank_and_alpha(module))`."""
        return self.scaling(*self.rank_and_alpha(module))

    # -- PEFT file format ----------------------------------------------------------------------
    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str = "adapter config") -> "LoraConfig":
        """Build from a PEFT `adapter_config.json` dict: `peft_type` must be "LORA", unknown keys
        warn, PEFT options that change the math (DoRA, ...) raise `ConfigError`."""
        if not isinstance(data, dict):
            raise ConfigError(f"{source}: expected a JSON object, found {type(data).__name__}")
        peft_type = data.get("peft_type")
        if peft_type is None:
            raise ConfigError(f"{source}: missing required key 'peft_type' (expected \"LORA\")")
        if str(peft_type).upper() != "LORA":
            raise ConfigError(f"{source}: peft_type: only \"LORA\" adapters are supported, "
                              f"found {peft_type!r}")
        for key, default in _UNSUPPORTED_IF_SET.items():
            if data.get(key, default) not in (default, None, False, [], {}):
                raise ConfigError(f"{source}: {key}={data[key]!r} is not supported by lorafleet")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known - _IGNORED_PEFT_KEYS)
        if unknown:
            message = f"{source}: ignoring unknown keys {unknown}"
            log.warning(message)
            warnings.warn(message, stacklevel=2)
        kwargs = {k: v for k, v in data.items() if k in known}
        try:
            return cls(**kwargs)
        except ConfigError as exc:
            raise ConfigError(f"{source}: {exc}") from None

    @classmethod
    def from_peft(cls, path: str | Path) -> "LoraConfig":
        """Read `adapter_config.json` from a PEFT adapter folder (or the file itself)."""
        path = Path(path)
        file = path / CONFIG_NAME if path.is_dir() else path
        if not file.is_file():
            raise AdapterError(f"{path}: no {CONFIG_NAME} found (expected a PEFT adapter folder)")
        return cls.from_dict(read_json(file), source=str(file))

    def to_peft_dict(self) -> dict[str, Any]:
        """The dict PEFT writes as `adapter_config.json` (loadable by `PeftModel.from_pretrained`)."""
        data = asdict(self)
        if isinstance(self.target_modules, list):
            data["target_modules"] = sorted(set(self.target_modules))
        data.update(peft_type="LORA", inference_mode=True, lora_bias=False,
                    layer_replication=None, revision=None)
        return data


INIT_METHODS = ("gaussian", "pissa", "pissa_niter_N", "olora", "loftq")


def is_init_method(init: str) -> bool:
    """An `init_lora_weights` string PEFT defines and lorafleet implements (lora/init.py)."""
    if init.lower() == "gaussian" or init in ("pissa", "olora", "loftq"):
        return True
    match = re.fullmatch(r"pissa_niter_(\d+)", init)
    return match is not None and int(match[1]) > 0


def pattern_key(patterns: Sequence[str], name: str) -> str | None:
    """The first key of a rank/alpha pattern that matches the end of `name` on a '.' boundary,
    as a regular expression (PEFT's `get_pattern_key`); None when none matches."""
    for key in patterns:
        if re.match(rf"(.*\.)?({key})$", name):
            return key
    return None


def _check_rank(name: str, value: Any) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise ConfigError(f"{name}: expected a positive integer rank, found {value!r}")


def _check_number(name: str, value: Any) -> None:
    if (not isinstance(value, (int, float)) or isinstance(value, bool)
            or not math.isfinite(value) or value <= 0):
        raise ConfigError(f"{name}: expected a positive finite number, found {value!r}")


def _names_or_regex(name: str, value: Any) -> list[str] | str | None:
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, (list, tuple, set)) and all(isinstance(v, str) for v in value):
        if not value and name == "target_modules":
            raise ConfigError(f"{name}: an empty list matches no module")
        # Sorted: PEFT stores names as a set, so their order carries no meaning.
        return sorted(set(value))
    raise ConfigError(f"{name}: expected a list of module names, a regex string or "
                      f"\"{ALL_LINEAR}\", found {value!r}")
