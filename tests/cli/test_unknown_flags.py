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


def test_vllm_underscore_spellings_are_accepted():
    from lorafleet.cli import vllm_spellings
    from lorafleet.cli.config_file import apply_config_file

    argv = vllm_spellings(["serve", "--model", "m", "--max_loras", "3", "--api_key=k1",
                           "--max-lora-rank", "8", "--", "--not_a_flag"])
    assert argv == ["serve", "--model", "m", "--max-loras", "3", "--api-key=k1",
                    "--max-lora-rank", "8", "--", "--not_a_flag"]
    parser = build_parser()
    apply_config_file(parser, argv[:-2])
    args = parser.parse_args(argv[:-2])
    assert (args.max_loras, args.api_key, args.max_lora_rank) == (3, ["k1"], 8)


@pytest.mark.parametrize("argv", [
    ["--api-kee", "sk-very-secret-1234"],              # a typo of --api-key, value apart
    ["--apikey=sk-very-secret-1234"],                   # closest to --api-key, value joined
    ["--auth-token", "sk-very-secret-1234"],            # a secret word in the flag itself
    ["sk-very-secret-1234"],                            # an OpenAI-style key on its own
    ["--api_kee", "sk-very-secret-1234"],               # vLLM's underscores, then the typo
])
def test_a_key_in_an_unknown_argument_is_never_printed(argv, capsys):
    with pytest.raises(SystemExit):
        main(["serve", "--model", "m", "--max-loras", "2", *argv])
    err = capsys.readouterr().err
    assert "unrecognized arguments" in err and "***" in err
    assert "very-secret" not in err, err


def test_other_unknown_values_are_shown(capsys):
    with pytest.raises(SystemExit):
        main(["serve", "--model", "m", "--max-num-seqz", "9"])
    assert "unrecognized arguments: --max-num-seqz 9;" in capsys.readouterr().err
