"""`lorafleet bench model` runs end to end on a tiny model and reports both implementations."""
import json

import pytest

from lorafleet.cli import main


@pytest.mark.slow
def test_bench_model_smoke(tmp_path, capsys):
    out = tmp_path / "bench.json"
    assert main(["bench", "model", "--hidden", "64", "--layers", "1", "--heads", "4",
                 "--kv-heads", "2", "--vocab", "384", "--prompt", "8", "--new", "4",
                 "--repeats", "1", "--dtype", "fp32", "--json", str(out)]) == 0
    report = json.loads(out.read_text())
    assert set(report["results"]) == {"prefill", "generate"}
    assert all(r["ours_tok_s"] > 0 and r["transformers_tok_s"] > 0
               for r in report["results"].values())
    assert report["greedy_tokens_equal"] == "4/4"  # fp32: same tokens as transformers
    assert "prefill" in capsys.readouterr().out
