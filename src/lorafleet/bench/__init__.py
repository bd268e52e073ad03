"""Benchmarks are programs (STYLE.md rule 12): each module here is one `lorafleet bench NAME`,
with `add_arguments(parser)` and `run(args) -> dict` (the JSON it also writes). `benchmarks/`
at the repository root holds thin scripts that call these."""
