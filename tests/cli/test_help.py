"""`--help` renders for the program, every job and every sub-job (`bench NAME`, `adapters
ACTION`): argparse formats help strings with %, so a stray percent sign in a help text or a
dataclass field's metadata crashes `--help` with a TypeError instead of printing it."""
import pytest

from lorafleet.cli import build_parser, main

from .test_unknown_flags import _jobs

PARENTS = sorted({path[:-1] for path, _ in _jobs(build_parser()) if len(path) > 1})
JOBS = [path for path, _ in _jobs(build_parser())]


@pytest.mark.parametrize("path", [(), *PARENTS, *JOBS], ids=lambda p: " ".join(p) or "lorafleet")
def test_help_renders(path, capsys):
    with pytest.raises(SystemExit) as stop:
        main([*path, "--help"])
    assert stop.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith("usage:")
    if path:
        assert path[-1] in out.splitlines()[0]
