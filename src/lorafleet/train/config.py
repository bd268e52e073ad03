"""TrainConfig: every setting of a training run, in one place.

The fields are the `lorafleet train` flags: the CLI builds its arguments from these fields and
their `metadata` (help text, choices, group), so defaults and help exist once. What the method
itself needs (lora rank, targets, bottleneck width, ...) lives in `MethodConfig`, held whole in
`TrainConfig.method`; `TrainConfig.from_flat(...)` takes the flat form people type
(`method="lora", r=16, lr=1e-3`, or TRL / Axolotl spellings: `learning_rate=1e-3`) and sorts
the keys into the two.
"""
from __future__ import annotations

import difflib
from dataclasses import asdict, dataclass, field, fields

from lorafleet.errors import ConfigError
from lorafleet.models.dtype import AUTO, DTYPE_CHOICES, parse_dtype
from lorafleet.train.data import DataConfig
from lorafleet.train.sources import RECORD_FORMATS
from lorafleet.train.methods import MethodConfig
from lorafleet.train.optim import OPTIMIZERS

SCHEDULES = ("cosine", "linear", "constant")
PARALLEL = ("auto", "none", "ddp", "fsdp")
REPORT_TO = ("none", "tensorboard", "wandb")

# TRL (TrainingArguments, SFTConfig, peft.LoraConfig) and Axolotl keys that mean what ours mean.
# A config file may use either spelling; the CLI takes the TRL_FLAGS ones as flags too.
ALIASES = {
    "learning_rate": "lr", "num_train_epochs": "epochs", "max_steps": "steps",
    "per_device_train_batch_size": "batch_size", "micro_batch_size": "batch_size",
    "gradient_accumulation_steps": "grad_accum", "warmup_steps": "warmup",
    "save_total_limit": "keep_checkpoints", "lora_r": "r", "lora_alpha": "alpha",
    "lora_dropout": "dropout", "lora_target_modules": "targets", "target_modules": "targets",
    "max_seq_length": "max_len", "max_length": "max_len", "sequence_len": "max_len",
    "packing": "pack", "sample_packing": "pack", "lr_scheduler_type": "schedule",
    "lr_scheduler": "schedule", "gradient_checkpointing": "grad_checkpointing",
    "output_dir": "out", "base_model": "model", "model_name_or_path": "model",
    "eval_steps": "eval_every", "save_steps": "save_every", "train_on_inputs": "train_on_prompt",
    "val_set_size": "val_split", "adapter": "method", "cosine_min_lr_ratio": "min_lr_ratio",
    "peft_use_rslora": "use_rslora",
}
TRL_FLAGS = ("learning_rate", "num_train_epochs", "per_device_train_batch_size",
             "gradient_accumulation_steps", "save_total_limit", "lora_r", "lora_alpha",
             "lora_target_modules", "max_steps", "warmup_steps")
# Values TRL / Axolotl spell differently.
VALUE_ALIASES = {
    "optim": {"adamw_torch": "adamw", "adamw_hf": "adamw", "adamw_torch_fused": "adamw",
              "adamw_bnb_8bit": "adamw8bit", "adamw_8bit": "adamw8bit",
              "paged_adamw_32bit": "paged_adamw"},
    "schedule": {"constant_with_warmup": "constant"},
}


def normalize_keys(values: dict, source: str = "config") -> dict:
    """Flat TrainConfig keys from a mapping people write: our names, TRL / Axolotl names
    (ALIASES), train_config.json's nested `method`, lists of target modules. Keys that would
    give an adapter the engine cannot serve are refused here, with the reason."""
    flat: dict = {}
    origin: dict = {}

    def put(key, value, spelled):
        if key in flat and flat[key] != value:
            raise ConfigError(f"{source}: {spelled!r} and {origin[key]!r} both set {key} "
                              f"({value!r} vs {flat[key]!r})")
        flat[key], origin[key] = value, spelled

    for raw_key, value in values.items():
        key = str(raw_key).strip().lstrip("-").replace("-", "_")
        if key == "method" and isinstance(value, dict):   # train_config.json
            for k, v in normalize_keys(value, source).items():
                put(k, v, f"method.{k}")
            continue
        if key == "config":
            continue
        if key == "completion_only_loss":                 # TRL: the opposite of ours
            put("train_on_prompt", not value, key)
            continue
        if key == "lora_target_linear":                   # Axolotl
            if value:
                put("targets", "all-linear", key)
            continue
        if key == "modules_to_save":
            if value:
                raise ConfigError(
                    f"{source}: modules_to_save={value!r}: the serving engine serves LoRA A/B "
                    "weights only, not whole copies of modules (every adapter would carry its own "
                    "copy of them); train those modules with --method full and merge, or leave "
                    "them out")
            continue
        name = ALIASES.get(key, key)
        if name == "targets" and isinstance(value, (list, tuple)):
            value = ",".join(str(v) for v in value)
        if isinstance(value, str) and name in VALUE_ALIASES:
            value = VALUE_ALIASES[name].get(value, value)
        put(name, value, str(raw_key))
    return flat


def option(default, help: str, group: str, **argparse_kw):
    """A dataclass field that is also a CLI flag: `help`, `group` and argparse extras
    (choices, metavar) travel in the field's metadata."""
    return field(default=default, metadata={"help": help, "group": group, **argparse_kw})


@dataclass
class TrainConfig:
    model: str = field(metadata={"help": "base model folder (config.json, safetensors, "
                                         "tokenizer.json)", "group": "required"})
    data: str = field(metadata={"help": "training data: JSONL, JSON, CSV, Parquet or a datasets "
                                        "folder (save_to_disk)", "group": "required"})
    out: str = field(metadata={"help": "output folder: adapter/, checkpoints/, log.jsonl",
                               "group": "required"})
    method: MethodConfig = field(default_factory=MethodConfig)
    dtype: str = option(AUTO, "dtype of the frozen base for lora (auto|bfloat16|float16|"
                        "float32; auto: the checkpoint's dtype where the device computes it "
                        "well, else float32) and of the non-quantized parts for qlora (auto: "
                        "bf16 where the device computes it); trained weights stay float32; "
                        "other methods train in float32",
                        "method", choices=DTYPE_CHOICES, metavar="DTYPE")
    steps: int | None = option(None, "optimizer steps (default: 1 epoch)", "optimization")
    epochs: float | None = option(None, "passes over the data (default 1)", "optimization")
    lr: float = option(2e-4, "peak learning rate (~2e-5 suits --method full)", "optimization")
    weight_decay: float = option(0.0, "AdamW weight decay", "optimization")
    batch_size: int = option(4, "examples per micro-batch and process", "optimization")
    grad_accum: int = option(1, "micro-batches per optimizer step", "optimization")
    warmup: int = option(0, "linear warmup steps", "optimization")
    warmup_ratio: float = option(0.0, "linear warmup over this fraction of the steps (instead "
                                 "of --warmup)", "optimization")
    schedule: str = option("cosine", "decay after warmup, to min-lr-ratio x lr", "optimization",
                           choices=SCHEDULES)
    min_lr_ratio: float = option(0.1, "LR floor: final lr / peak lr (nanoGPT: 0.1; 0: decay "
                                 "to zero as TRL does)", "optimization")
    max_grad_norm: float = option(1.0, "gradient clipping (0: off)", "optimization")
    optim: str = option("adamw", "adamw; adamw8bit (8-bit moments, bitsandbytes); paged_adamw "
                        "(state paged between GPU and host, CUDA only)", "optimization",
                        choices=OPTIMIZERS)
    bf16: bool = option(False, "bf16 autocast (parameters keep their dtype)", "optimization")
    grad_checkpointing: bool = option(False, "recompute activations in backward: less memory, "
                                             "~30% slower", "optimization")
    seed: int = option(0, "seed for initialization, shuffling and dropout", "optimization")
    max_len: int = option(512, "tokens per example; longer ones are truncated (counted)", "data")
    pack: bool = option(False, "several whole examples per --max-len row (no padding); each "
                        "attends only to itself", "data")
    train_on_prompt: bool = option(False, "loss on prompt / user tokens too (TRL "
                                   "completion_only_loss=false, Axolotl train_on_inputs)", "data")
    chat_template: str | None = option(None, "Jinja chat template for messages records: a "
                                       "file or the template itself (default: the model's)",
                                       "data", metavar="FILE|TEMPLATE")
    format: str = option("auto", "record layout: auto (by keys), prompt (prompt/completion), "
                         "messages, text, alpaca (instruction/input/output), sharegpt "
                         "(conversations of from/value)", "data", choices=RECORD_FORMATS)
    columns: str | None = option(None, "column mapping OURS=THEIRS,...: e.g. "
                                 "prompt=question,completion=answer", "data", metavar="MAP")
    val_file: str | None = option(None, "validation JSONL", "data")
    val_split: float = option(0.0, "fraction of --data held out for validation", "data")
    skip_bad_lines: bool = option(False, "skip malformed JSONL lines (counted) instead of "
                                         "stopping", "data")
    eval_every: int = option(0, "evaluate every N steps (0: at the end only)", "run")
    save_every: int = option(0, "checkpoint every N steps (0: only on Ctrl-C / SIGTERM); each "
                             "checkpoint holds a servable adapter/ folder", "run")
    keep_checkpoints: int = option(2, "checkpoints kept, newest first (TRL save_total_limit)",
                                   "run")
    report_to: str = option("none", "also log to tensorboard or wandb (offline unless "
                            "WANDB_MODE says otherwise); log.jsonl is always written", "run",
                            choices=REPORT_TO)
    resume: bool = option(False, "continue the run in --out", "run")
    overwrite: bool = option(False, "replace the run in --out", "run")
    parallel: str = option("auto", "several processes (torchrun): ddp replicates the model and "
                           "averages gradients; fsdp shards parameters, gradients and optimizer "
                           "state (FSDP2); auto: ddp under torchrun, none otherwise", "run",
                           choices=PARALLEL)
    device: str | None = option(None, "cpu, cuda, cuda:1 (default: cuda if available)", "run")

    def __post_init__(self):
        if isinstance(self.method, dict):  # from train_config.json
            self.method = MethodConfig(**self.method)
        if not isinstance(self.method, MethodConfig):
            raise ConfigError(f"method: expected a MethodConfig (found {self.method!r}); use "
                              "TrainConfig.from_flat(method='lora', r=..., ...) for flat keys")
        for name, allowed in (("schedule", SCHEDULES), ("optim", OPTIMIZERS),
                              ("parallel", PARALLEL), ("report_to", REPORT_TO),
                              ("format", RECORD_FORMATS)):
            if getattr(self, name) not in allowed:
                raise ConfigError(f"{name} must be one of {allowed} "
                                  f"(found {getattr(self, name)!r})")
        parse_dtype(self.dtype, "dtype")
        if self.steps is not None and self.epochs is not None:
            raise ConfigError("give steps or epochs, not both")
        if not 0.0 <= self.warmup_ratio < 1.0:
            raise ConfigError(f"warmup_ratio must be in [0, 1) (found {self.warmup_ratio})")
        if self.warmup_ratio and self.warmup:
            raise ConfigError("give warmup (steps) or warmup_ratio, not both")
        if not 0.0 <= self.min_lr_ratio <= 1.0:
            raise ConfigError(f"min_lr_ratio must be in [0, 1] (found {self.min_lr_ratio})")
        for name in ("batch_size", "grad_accum", "keep_checkpoints"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be >= 1 (found {getattr(self, name)})")
        if self.resume and self.overwrite:
            raise ConfigError("resume and overwrite exclude each other")
        if self.val_file and self.val_split:
            raise ConfigError("give val_file or val_split, not both")

    @classmethod
    def from_flat(cls, **values) -> TrainConfig:
        """TrainConfig from flat keys: MethodConfig's fields (method, r, alpha, dropout, targets,
        bottleneck, virtual_tokens) go into `.method`, the rest are TrainConfig's. An unknown key
        is a ConfigError naming it."""
        values = normalize_keys(values, "settings")
        method_keys = {f.name for f in fields(MethodConfig)}
        own_keys = {f.name for f in fields(cls)} - {"method"}
        unknown = sorted(set(values) - method_keys - own_keys)
        if unknown:
            spellings = sorted(method_keys | own_keys | set(ALIASES))
            close = {k: difflib.get_close_matches(k, spellings, n=1) for k in unknown}
            hints = "; ".join(f"{k} -> did you mean {c[0]}?" for k, c in close.items() if c)
            raise ConfigError(f"unknown training setting(s) {unknown}" +
                              (f" ({hints})" if hints else "") +
                              f"; known: {sorted(method_keys | own_keys)}")
        method = MethodConfig(**{k: v for k, v in values.items() if k in method_keys})
        return cls(method=method, **{k: v for k, v in values.items() if k in own_keys})

    def to_json(self) -> dict:
        return asdict(self)

    def warmup_steps(self, total_steps: int) -> int:
        return round(self.warmup_ratio * total_steps) if self.warmup_ratio else self.warmup

    def data_config(self) -> DataConfig:
        return DataConfig(self.data, self.max_len, self.pack, self.val_file, self.val_split,
                          self.skip_bad_lines, mask_prompt=not self.train_on_prompt,
                          seed=self.seed, format=self.format, columns=self.columns)
