"""A fast kernel that cannot be built says so once per process (a warning naming the kernel and
the torch path it falls back to), not on every call that asks for it; `lorafleet env` then
reports the reason."""
import importlib
import logging

import pytest

from lorafleet.cli.env import KERNELS


@pytest.mark.parametrize("label, module_name, loader", KERNELS, ids=[k[1] for k in KERNELS])
def test_a_kernel_that_cannot_build_warns_once(label, module_name, loader, monkeypatch, caplog,
                                               tmp_path):
    load = getattr(importlib.import_module(module_name), loader)
    for switch in ("LORAFLEET_SGMV_KERNEL", "LORAFLEET_ATTENTION_KERNEL",
                   "LORAFLEET_NF4_KERNEL"):
        monkeypatch.delenv(switch, raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))      # nothing built already
    monkeypatch.setenv("CC", "/bin/false")                    # a compiler that fails
    load.cache_clear()
    try:
        with caplog.at_level(logging.WARNING, logger="lorafleet"):
            assert all(load() is None for _ in range(3))
        warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
        assert len(warnings) == 1, [r.getMessage() for r in warnings]
        assert "torch path" in warnings[0].getMessage()
    finally:
        load.cache_clear()          # the rest of the session builds (or finds) the real one
