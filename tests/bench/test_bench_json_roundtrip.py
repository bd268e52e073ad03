"""A measured run's JSON re-renders to the same doc block as the run itself wrote: `--json` +
`--update-doc` on a tiny run, then `--from-json` + `--update-doc` on a fresh doc, must agree
(so what tests/bench/test_doc_tables.py re-renders is what the measurement produced)."""
from __future__ import annotations

import json

import pytest

from lorafleet.bench.doc_block import markers
from lorafleet.cli import main

TINY = {
    "roofline": ["--n", "64", "--repeats", "1"],
    "kernels": ["--hidden", "64", "--ranks", "4,8", "--decode-rows", "5", "--decode-adapters",
                "3", "--prefill-segments", "2x8", "--context", "16", "--heads", "4,2",
                "--repeats", "1"],
    "quant": ["--shapes", "128x256", "--tokens", "1,4", "--repeats", "1"],
    "model": ["--hidden", "64", "--layers", "1", "--heads", "4", "--kv-heads", "2", "--vocab",
              "384", "--prompt", "8", "--new", "4", "--repeats", "1", "--dtype", "fp32",
              "--clock", "cpu"],
}


@pytest.mark.slow
@pytest.mark.parametrize("name", list(TINY))
def test_measured_block_equals_its_json_rendering(name, tmp_path, capsys):
    out, measured, rerendered = (tmp_path / f"{name}.json", tmp_path / "measured.md",
                                 tmp_path / "rerendered.md")
    measured.write_text("# doc\n")
    assert main(["bench", name, *TINY[name], "--json", str(out),
                 "--update-doc", str(measured)]) == 0
    rerendered.write_text("# doc\n")
    assert main(["bench", name, "--from-json", str(out), "--update-doc", str(rerendered)]) == 0
    capsys.readouterr()
    begin, end = markers(name)
    text = measured.read_text()
    assert begin in text and end in text and "|---" in text
    assert rerendered.read_text() == text
    report = json.loads(out.read_text())
    # the run says where it ran; --update-doc (an output path) is not part of the command
    assert report["run"]["command"].startswith(f"lorafleet bench {name}")
    assert "--update-doc" not in report["run"]["command"]
