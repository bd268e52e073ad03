"""Every job, sub-jobs included (`bench NAME`, `adapters ACTION`), answers a mistyped flag with
its closest known one, as `lorafleet serve` does for vLLM's spellings."""
import argparse

import pytest

from lorafleet.cli import build_parser, main


def _jobs(parser, path=()):
    """(argv prefix, parser) for every job and sub-job."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from _jobs(sub, path + (name,))
            return
    if path:
        yield path, parser


def _required(parser) -> list[str]:
    """Placeholder values for the job's required arguments (parsing stops at the unknown flag
    before any value is used)."""
    argv = []
    for action in parser._actions:
        if action.option_strings and action.required:
            argv += [action.option_strings[-1], "1"]
        elif not action.option_strings and action.nargs != 0 and \
                not isinstance(action, argparse._SubParsersAction):
            argv += ["1"]
    return argv


JOBS = list(_jobs(build_parser()))


def test_every_job_is_covered():
    names = {" ".join(path) for path, _ in JOBS}
    assert {"serve", "train", "generate", "merge", "quantize", "eval", "bench model",
            "bench serve", "adapters inspect", "adapters combine"} <= names


@pytest.mark.parametrize("path, parser", JOBS, ids=[" ".join(p) for p, _ in JOBS])
def test_a_mistyped_flag_gets_the_closest(path, parser, capsys):
    flags = [s for a in parser._actions for s in a.option_strings
             if s.startswith("--") and len(s) >= 5 and s not in ("--version", "--verbose")]
    if not flags:
        pytest.skip(f"{' '.join(path)} has no long flags")
    flag = flags[0]
    typo = flag[:4] + flag[5:]             # one letter dropped
    with pytest.raises(SystemExit) as exc:
        main(list(path) + _required(parser) + [typo])
    err = capsys.readouterr().err
    assert exc.value.code == 2
    assert f"lorafleet {' '.join(path)}: error: unrecognized arguments: {typo}" in err, err
    assert f"{typo} -> did you mean --" in err, err
