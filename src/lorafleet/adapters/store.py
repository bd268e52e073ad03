"""An on-disk adapter store: a folder of PEFT folders, one per adapter, named after it.

    store/
      sql-assistant/   adapter_config.json  adapter_model.safetensors
      support-bot/     ...

The serving engine registers every adapter of a store (`Engine.register_store`); `add` copies a
PEFT folder in, `remove` deletes one. Names are folder names, so they are checked to be plain.
"""
from __future__ import annotations

import re
import shutil
from pathlib import Path

from lorafleet.errors import AdapterError

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


def check_name(name: str) -> str:
    if not _NAME.match(name or ""):
        raise AdapterError(f"adapter name {name!r} must be 1-128 letters, digits, '.', '_' or "
                           f"'-', starting with a letter or digit")
    return name


class AdapterStore:
    def __init__(self, root: str | Path, create: bool = False):
        self.root = Path(root)
        if create:
            self.root.mkdir(parents=True, exist_ok=True)
        if not self.root.is_dir():
            raise AdapterError(f"adapter store {self.root} is not a folder")

    def names(self) -> list[str]:
        """Every subfolder that holds an adapter_config.json, sorted."""
        return sorted(p.name for p in self.root.iterdir()
                      if p.is_dir() and (p / CONFIG_NAME).is_file())

    def __contains__(self, name: str) -> bool:
        return (self.root / name / CONFIG_NAME).is_file()

    def __len__(self) -> int:
        return len(self.names())

    def path(self, name: str) -> Path:
        if name not in self:
            raise AdapterError(f"adapter {name!r} is not in the store {self.root} "
                               f"({len(self)} adapters)")
        return self.root / name

    def add(self, name: str, source: str | Path, overwrite: bool = False) -> Path:
        """Copy the PEFT folder `source` into the store as `name`."""
        source, target = Path(source), self.root / check_name(name)
        for needed in (CONFIG_NAME, WEIGHTS_NAME):
            if not (source / needed).is_file():
                raise AdapterError(f"{source} is not a PEFT adapter folder: missing {needed}")
        if target.exists():
            if not overwrite:
                raise AdapterError(f"adapter {name!r} already exists in {self.root}")
            shutil.rmtree(target)
        shutil.copytree(source, target)
        return target

    def remove(self, name: str) -> None:
        shutil.rmtree(self.path(name))
