"""One `--dtype` flag for every job that takes one: the same names and aliases
(auto|bfloat16|float16|float32, bf16/fp16/fp32), the same suggestion for a typo."""
import pytest
from safetensors import safe_open

from lorafleet.cli import build_parser, main

from ..api.conftest import make_adapters

JOBS = {"generate": ["--model", "m", "--prompt", "p"], "serve": ["--model", "m"],
        "train": ["--model", "m", "--data", "d", "--out", "o"], "eval": ["--model", "m",
                                                                            "--data", "d", "x"],
        "merge": ["--model", "m", "--adapter", "a", "--out", "o"], "quantize": ["--model", "m"]}


@pytest.mark.parametrize("job", JOBS)
def test_every_job_takes_the_same_dtype_names(job, capsys):
    parser = build_parser()
    for name in ("auto", "bfloat16", "float16", "float32", "bf16", "fp16", "fp32", "BF16"):
        assert parser.parse_args([job, *JOBS[job], "--dtype", name]).dtype == name.lower()
    with pytest.raises(SystemExit):
        main([job, *JOBS[job], "--dtype", "bfloat15"])
    assert "did you mean 'bfloat16'?" in capsys.readouterr().err


def test_merge_writes_the_dtype_asked_in_any_spelling(tmp_path, llama_dir):
    (adapter,) = make_adapters(llama_dir, tmp_path, ["a"]).values()
    for spelling, expected in (("bf16", "BF16"), ("auto", "F32")):   # auto: the checkpoint's
        out = tmp_path / spelling
        assert main(["merge", "--model", str(llama_dir), "--adapter", str(adapter), "--out",
                     str(out), "--dtype", spelling, "--no-progress"]) == 0
        dtypes = set()
        for file in out.glob("*.safetensors"):
            with safe_open(str(file), "pt") as f:
                dtypes |= {f.get_slice(k).get_dtype() for k in f.keys()}
        assert dtypes == {expected}, (spelling, dtypes)
