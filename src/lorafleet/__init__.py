"""lorafleet: one frozen base model, a fleet of small low-rank adapters.

    import lorafleet as lf
    lf.inject_lora(model, lf.LoraConfig(r=8, target_modules=["q_proj", "v_proj"]))
    ...train...
    lf.save_adapter(model, "my-adapter")          # a PEFT folder
    lf.load_adapter(other_model, "my-adapter", adapter_name="task1")
    lf.merge(model, "default"); lf.unmerge(model)

The names below are imported on first use, so `import lorafleet` stays light (no torch).
"""
from pathlib import Path

__version__ = "0.1.0"

# The small Llama (Shakespeare + Milton) that ships inside the package: `make demo`'s base model.
EMBEDDED_BASE = Path(__file__).resolve().parent / "assets" / "base-model"

_API = {
    "load_model": "lorafleet.models.loader",
    "load_tokenizer": "lorafleet.models.tokenizer",
    "LoraConfig": "lorafleet.lora.config",
    "inject_lora": "lorafleet.lora.inject",
    "count_parameters": "lorafleet.lora.inject",
    "count_lora_parameters": "lorafleet.lora.inject",
    "row_adapters": "lorafleet.lora.inject",
    "set_adapter": "lorafleet.lora.inject",
    "adapter_names": "lorafleet.lora.inject",
    "merge": "lorafleet.lora.merge",
    "unmerge": "lorafleet.lora.merge",
    "unload": "lorafleet.lora.merge",
    "merge_checkpoint": "lorafleet.lora.merge",
    "load_adapter": "lorafleet.lora.peft_model",
    "save_adapter": "lorafleet.lora.peft_model",
    "add_weighted_adapter": "lorafleet.lora.ops",
    "delete_adapter": "lorafleet.lora.ops",
    "disable_adapter": "lorafleet.lora.ops",
    "combine_folders": "lorafleet.lora.combine",
}
__all__ = sorted(_API)


def __getattr__(name: str):
    if name in _API:
        import importlib

        value = getattr(importlib.import_module(_API[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'lorafleet' has no attribute {name!r}")


def __dir__():
    return sorted(list(globals()) + __all__)
