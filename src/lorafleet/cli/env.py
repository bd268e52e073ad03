"""`lorafleet env`: what this machine gives lorafleet: versions, devices, which fast kernels
built (and why one did not: the reason the kernel's build logged), optional packages."""
from __future__ import annotations

import importlib.metadata
import logging
import platform

from lorafleet.cli import EXTRAS

# (label, module, loader): each loader builds (or loads the cached) kernel, None when it cannot.
KERNELS = (
    ("SGMV LoRA kernel (serve, CPU)", "lorafleet.serve.sgmv_cpu", "_load"),
    ("paged decode attention (serve, CPU)", "lorafleet.serve.attention_cpu", "_load"),
    ("NF4 matmul kernel (qlora/quantized serve, CPU)", "lorafleet.quant.kernel", "_load"),
)
# Optional packages -> the extra that installs them: the ones a job may need (cli.EXTRAS, the
# one copy of that map, pyproject.toml's extras), plus pyyaml (no extra) and openai (tests').
OPTIONAL = tuple({**EXTRAS, "pyyaml": "(config files)", "openai": "test"}.items())


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("env", help="versions, devices, fast kernels and why one fell back",
                              description="Report the environment lorafleet runs in: what "
                                          "built, what fell back to the plain PyTorch path "
                                          "and why, which optional packages are installed.")
    p.set_defaults(func=run)


class _Capture(logging.Handler):
    def __init__(self):
        super().__init__(logging.DEBUG)
        self.messages: list[str] = []

    def emit(self, record):
        self.messages.append(record.getMessage())


def kernel_status() -> list[tuple[str, bool, str]]:
    """(label, built, detail) per kernel; detail is the fallback reason when not built."""
    import importlib
    import os
    rows = []
    for label, module_name, loader in KERNELS:
        capture = _Capture()
        root = logging.getLogger("lorafleet")
        root.addHandler(capture)
        propagate, root.propagate = root.propagate, False   # reported below, not twice
        try:
            module = importlib.import_module(module_name)
            load = getattr(module, loader)
            if hasattr(load, "cache_clear"):
                load.cache_clear()       # build now, so its reason is logged to us
            lib = load()
        finally:
            root.removeHandler(capture)
            root.propagate = propagate
        if lib is not None:
            rows.append((label, True, "built"))
            continue
        switches = [m for m in ("LORAFLEET_SGMV_KERNEL", "LORAFLEET_ATTENTION_KERNEL",
                                "LORAFLEET_NF4_KERNEL") if os.environ.get(m) == "0"]
        reason = "; ".join(capture.messages) or (
            f"switched off ({', '.join(switches)}=0)" if switches else "not built")
        rows.append((label, False, reason))
    return rows


def run(args) -> int:
    import torch

    from lorafleet import __version__
    from lorafleet.models.dtype import cpu_has_fast_bf16

    print(f"lorafleet {__version__}, python {platform.python_version()}, torch {torch.__version__}"
          f" on {platform.system()} {platform.machine()}")
    cuda = torch.cuda.is_available()
    devices = ", ".join(torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())) \
        if cuda else "none"
    print(f"CUDA: {devices}; CPU threads: {torch.get_num_threads()}; "
          f"fast bf16 on CPU: {'yes' if cpu_has_fast_bf16() else 'no (emulated, slower)'}")
    onednn = torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported()
    print(f"oneDNN bf16 prepacked linears (serve, CPU): {'yes' if onednn else 'no'}")
    print("kernels:")
    for label, built, detail in kernel_status():
        print(f"  {'ok  ' if built else 'slow'} {label}" + ("" if built else f": {detail}"))
    print("optional packages:")
    for package, extra in OPTIONAL:
        try:
            version = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            version = f"not installed (pip install 'lorafleet[{extra}]')" \
                if not extra.startswith("(") else f"not installed {extra}"
        print(f"  {package}: {version}")
    return 0
