"""Generated blocks in the docs: a table between two marker lines, rewritten from a run's JSON so
that a reader can rerun a benchmark and diff the doc."""
from __future__ import annotations

from pathlib import Path


def replace_block(path: Path, begin: str, end: str, block: str) -> None:
    """Write `block` (which starts with `begin` and ends with `end`) in place of the text between
    those markers in `path`, or append it when the markers are absent."""
    text = path.read_text() if path.is_file() else ""
    if begin in text and end in text:
        head, rest = text.split(begin, 1)
        text = head + block + rest.split(end, 1)[1]
    else:
        text = text.rstrip() + "\n\n" + block + "\n"
    path.write_text(text)
