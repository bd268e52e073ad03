"""Progress bars for the CLI: the library reports progress as `progress(done, total)` calls
(STYLE.md rule 8, `lorafleet.models.loader.Progress`); this turns them into a tqdm bar on
stderr, so stdout stays the command's output (JSON, tables) and can be piped."""
from __future__ import annotations

import os
import sys
from typing import TextIO


def add_progress_argument(parser) -> None:
    """`--no-progress`, the spelling `lorafleet train` uses."""
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")


class ProgressBar:
    """A `progress(done, total)` callback drawing one tqdm bar, created on the first call and
    closed when done reaches total. Draws nothing when disabled, or when `stream` (stderr by
    default) is not a terminal: logs and CI output get no carriage-return noise."""

    def __init__(self, description: str, unit: str = "tensor", enabled: bool = True,
                 stream: TextIO | None = None):
        self.description, self.unit = description, unit
        self.stream = sys.stderr if stream is None else stream
        self.enabled = enabled and self.stream.isatty()
        self.bar = None

    def __call__(self, done: int, total: int) -> None:
        if not self.enabled or total <= 0:      # nothing to count: no bar flashing by
            return
        if self.bar is None:
            from tqdm import tqdm  # lazily: a silent run never imports it

            self.bar = tqdm(total=total, desc=self.description, unit=self.unit,
                            file=self.stream, leave=False, dynamic_ncols=True)
        self.bar.update(done - self.bar.n)
        if done >= total:
            self.bar.close()
            self.bar = None


def progress_bar(args, description: str, unit: str = "tensor") -> ProgressBar:
    """The bar for a command whose arguments may carry `--no-progress`."""
    return ProgressBar(description, unit, enabled=not getattr(args, "no_progress", False))


def progress_factory(args):
    """`make(description, unit)` -> a bar callback (or a silent one under `--no-progress`), for
    code below the CLI that starts several loads or runs of its own (the benchmarks, which get it
    as `args.progress`: lorafleet.bench.progress_for)."""
    return lambda description, unit="tensor": progress_bar(args, description, unit)


def quiet_library_bars(args) -> None:
    """Where ours draw nothing (--no-progress, or stderr not a terminal), silence the bars that
    transformers and huggingface_hub draw on their own (a benchmark's oracle loading, saving a
    random checkpoint): the environment variable for those not yet imported and for child
    processes, transformers' switch when it already is."""
    if not getattr(args, "no_progress", False) and sys.stderr.isatty():
        return
    os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] = "1"
    if "transformers" in sys.modules:
        sys.modules["transformers"].utils.logging.disable_progress_bar()


def count_through(bar, items):
    """Yield `items` (a collection), calling `bar(done, total)` before the first and after each
    one (the adapters `serve` registers at start-up)."""
    items = list(items)
    bar(0, len(items))
    for done, item in enumerate(items, 1):
        yield item
        bar(done, len(items))


def load_base(args, dtype):
    """The base model `--model` names, in NF4 with `--quantize nf4` (lazily imported: only NF4
    users pay for it), with a loading bar; what `generate` and `serve` both load."""
    if getattr(args, "quantize", None) == "nf4":
        from lorafleet.quant import load_quantized_model

        return load_quantized_model(args.model, dtype=dtype, device=args.device,
                                    progress=progress_bar(args, "loading (nf4)"))
    from lorafleet.models import load_model

    return load_model(args.model, dtype=dtype, device=args.device,
                      progress=progress_bar(args, "loading"))
