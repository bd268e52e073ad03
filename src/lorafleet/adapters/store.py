"""An on-disk adapter store: a folder of PEFT folders, one per adapter, named after it.

    store/
      sql-assistant/   adapter_config.json  adapter_model.safetensors
      support-bot/     ...

The serving engine registers the adapters of a store lazily and finds folders added later
(`Engine.register_store`, `Engine.resolve_adapter`); `add` copies a PEFT folder in, `remove`
deletes one. Names are folder names, so they are checked to be plain (`check_name`, the one
adapter name rule, which every entry of the engine and the server applies), and every file of
an adapter folder must resolve inside the store (`folder`): a symlink cannot reach outside.
"""
from __future__ import annotations

import logging
import os
import re
import shutil
from pathlib import Path

from lorafleet.errors import AdapterError

log = logging.getLogger(__name__)

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
# \Z, not $: "$" also matches before a trailing newline ("alpha\n" would pass).
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}\Z")
# Labels the server uses for itself (the base model's metrics label): never an adapter's name.
RESERVED_NAMES = frozenset({"__base__"})


def check_name(name: str) -> str:
    if not isinstance(name, str) or not _NAME.match(name) or name in RESERVED_NAMES:
        raise AdapterError(f"adapter name {name!r} must be 1-128 letters, digits, '.', '_' or "
                           f"'-', starting with a letter or digit")
    return name


def is_valid_name(name: str) -> bool:
    return isinstance(name, str) and bool(_NAME.match(name)) and name not in RESERVED_NAMES


def confine(folder: Path, root: Path) -> Path:
    """`folder` and every file in it must resolve (symlinks followed) inside `root`. Returns
    the resolved folder; AdapterError naming the file that leaves it."""
    real_root = os.path.realpath(root)
    real = os.path.realpath(folder)
    try:
        # Only symlinks can lead out of a confined folder: resolve those alone (thousands of
        # folders are checked when a store is registered).
        entries = [os.path.realpath(entry.path) for entry in os.scandir(real)
                   if entry.is_symlink()]
    except OSError as exc:
        raise AdapterError(f"adapter folder {folder.name!r}: not readable ({exc})") from None
    for path in [real, *entries]:
        if os.path.commonpath([real_root, path]) != real_root or path == real_root:
            raise AdapterError(f"adapter folder {folder.name!r}: {path} is outside the adapter "
                               f"store {real_root} (symlinks may not leave it)")
    return Path(real)


class AdapterStore:
    def __init__(self, root: str | Path, create: bool = False):
        self.root = Path(root)
        if create:
            self.root.mkdir(parents=True, exist_ok=True)
        if not self.root.is_dir():
            raise AdapterError(f"adapter store {self.root} is not a folder")
        self._warned: set[str] = set()

    def names(self) -> list[str]:
        """Every subfolder that holds an adapter_config.json and whose name is a valid adapter
        name, sorted. Other entries are skipped (a folder with a bad name: a warning, once)."""
        names = []
        for entry in os.scandir(self.root):
            if not entry.is_dir() or not os.path.isfile(os.path.join(entry.path, CONFIG_NAME)):
                continue
            if is_valid_name(entry.name):
                names.append(entry.name)
            elif entry.name not in self._warned:
                self._warned.add(entry.name)
                log.warning("adapter store %s: skipping folder %r (not a valid adapter name)",
                            self.root, entry.name)
        return sorted(names)

    def __contains__(self, name: str) -> bool:
        return is_valid_name(name) and (self.root / name / CONFIG_NAME).is_file()

    def folder(self, name: str) -> Path | None:
        """The confined folder of adapter `name` (None if there is no such adapter; AdapterError
        if one of its files resolves outside the store)."""
        if name not in self:
            return None
        return confine(self.root / name, self.root)

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
