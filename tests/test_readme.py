"""The README's Python example runs as written, and `lorafleet --help` lists the jobs."""
import re
from pathlib import Path

import peft
import torch
import transformers

import lorafleet as lf

README = Path(__file__).resolve().parent.parent / "README.md"


def test_readme_example_runs_and_writes_a_peft_adapter(tmp_path, monkeypatch, capsys):
    code = re.search(r"```python\n(.*?)```", README.read_text(), re.S).group(1)
    monkeypatch.chdir(tmp_path)
    exec(compile(code, "README.md", "exec"), {})
    # q: 256 -> 256, v: 256 -> 64 (2 KV heads x 32): r * (in + out) per matrix, 4 layers.
    expected = 4 * 8 * ((256 + 256) + (256 + 64))
    assert f"{expected:,}" in capsys.readouterr().out
    # The adapter loads in peft over the same base (transformers reads the embedded folder).
    hf = transformers.AutoModelForCausalLM.from_pretrained(lf.EMBEDDED_BASE)
    peft_model = peft.PeftModel.from_pretrained(hf, tmp_path / "my-adapter")
    assert sum(p.numel() for n, p in peft_model.named_parameters() if "lora_" in n) == expected


def test_help_lists_every_job(capsys):
    from lorafleet.cli import main

    try:
        main(["--help"])
    except SystemExit:
        pass
    out = capsys.readouterr().out
    for job in ("generate", "train", "serve", "merge", "adapters", "quantize", "bench",
                "analyze", "demo"):
        assert job in out, job
