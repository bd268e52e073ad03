"""Benchmarks are programs (STYLE.md rule 12): each module here is one `lorafleet bench NAME`,
with `add_arguments(parser)` and `run(args) -> dict` (the JSON it also writes). `benchmarks/`
at the repository root holds thin scripts that call these."""


def progress_for(args, description: str, unit: str = "tensor"):
    """The `progress(done, total)` callback for one load or series of runs: the CLI's bar when
    `lorafleet bench` put a bar factory on `args` (STYLE.md rule 8: benchmarks print their tables,
    but bars are drawn by the CLI), else None (`python -m lorafleet.bench.NAME`, tests)."""
    make = getattr(args, "progress", None)
    return make(description, unit) if callable(make) else None
