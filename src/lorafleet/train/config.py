"""TrainConfig: every setting of a training run, in one place.

The fields are the `lorafleet train` flags: the CLI builds its arguments from these fields and
their `metadata` (help text, choices, group), so defaults and help exist once. What the method
itself needs (lora rank, targets, bottleneck width, ...) lives in `MethodConfig`, held whole in
`TrainConfig.method`; `TrainConfig.from_flat(...)` takes the flat form people type
(`method="lora", r=16, lr=1e-3`) and sorts the keys into the two.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields

from lorafleet.errors import ConfigError
from lorafleet.models.dtype import AUTO, DTYPE_CHOICES, parse_dtype
from lorafleet.train.data import DataConfig
from lorafleet.train.methods import MethodConfig
from lorafleet.train.optim import OPTIMIZERS

SCHEDULES = ("cosine", "linear", "constant")
PARALLEL = ("auto", "none", "ddp", "fsdp")


def option(default, help: str, group: str, **argparse_kw):
    """A dataclass field that is also a CLI flag: `help`, `group` and argparse extras
    (choices, metavar) travel in the field's metadata."""
    return field(default=default, metadata={"help": help, "group": group, **argparse_kw})


@dataclass
class TrainConfig:
    model: str = field(metadata={"help": "base model folder (config.json, safetensors, "
                                         "tokenizer.json)", "group": "required"})
    data: str = field(metadata={"help": "training data, JSONL", "group": "required"})
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
    schedule: str = option("cosine", "decay after warmup, to min-lr-ratio x lr", "optimization",
                           choices=SCHEDULES)
    min_lr_ratio: float = option(0.1, "final lr / peak lr (nanoGPT: 0.1)", "optimization")
    max_grad_norm: float = option(1.0, "gradient clipping (0: off)", "optimization")
    optim: str = option("adamw", "adamw; adamw8bit (8-bit moments, bitsandbytes); paged_adamw "
                        "(state paged between GPU and host, CUDA only)", "optimization",
                        choices=OPTIMIZERS)
    bf16: bool = option(False, "bf16 autocast (parameters keep their dtype)", "optimization")
    grad_checkpointing: bool = option(False, "recompute activations in backward: less memory, "
                                             "~30% slower", "optimization")
    seed: int = option(0, "seed for initialization, shuffling and dropout", "optimization")
    max_len: int = option(512, "tokens per example; longer ones are truncated (counted)", "data")
    pack: bool = option(False, "concatenate examples into --max-len rows (no padding)", "data")
    val_file: str | None = option(None, "validation JSONL", "data")
    val_split: float = option(0.0, "fraction of --data held out for validation", "data")
    skip_bad_lines: bool = option(False, "skip malformed JSONL lines (counted) instead of "
                                         "stopping", "data")
    eval_every: int = option(0, "evaluate every N steps (0: at the end only)", "run")
    save_every: int = option(0, "checkpoint every N steps (0: only on Ctrl-C / SIGTERM)", "run")
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
                              ("parallel", PARALLEL)):
            if getattr(self, name) not in allowed:
                raise ConfigError(f"{name} must be one of {allowed} "
                                  f"(found {getattr(self, name)!r})")
        parse_dtype(self.dtype, "dtype")
        if self.steps is not None and self.epochs is not None:
            raise ConfigError("give steps or epochs, not both")
        for name in ("batch_size", "grad_accum"):
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
        method_keys = {f.name for f in fields(MethodConfig)}
        own_keys = {f.name for f in fields(cls)} - {"method"}
        unknown = sorted(set(values) - method_keys - own_keys)
        if unknown:
            raise ConfigError(f"unknown training setting(s) {unknown}; known: "
                              f"{sorted(method_keys | own_keys)}")
        method = MethodConfig(**{k: v for k, v in values.items() if k in method_keys})
        return cls(method=method, **{k: v for k, v in values.items() if k in own_keys})

    def to_json(self) -> dict:
        return asdict(self)

    def data_config(self) -> DataConfig:
        return DataConfig(self.data, self.max_len, self.pack, self.val_file, self.val_split,
                          self.skip_bad_lines, seed=self.seed)
