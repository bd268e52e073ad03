"""`lorafleet quantize` and `lorafleet bench quant` through the real CLI entry point."""
import json

from lorafleet.cli import main


def test_quantize_reports_bits_and_logit_error(llama_dir, capsys):
    assert main(["quantize", "--model", str(llama_dir), "--check", "8"]) == 0
    out = capsys.readouterr().out
    assert "bits/param" in out and "relative error" in out
    bits = float(out.split(" bits/param")[0].split("= ")[-1])
    assert 4.12 < bits < 4.2


def test_quantize_bad_block_size_is_a_clear_error(llama_dir, capsys):
    assert main(["quantize", "--model", str(llama_dir), "--block-size", "6"]) == 1
    assert "block_size" in capsys.readouterr().err


def test_bench_quant_small_run_writes_json(tmp_path, capsys):
    out = tmp_path / "quant.json"
    assert main(["bench", "quant", "--shapes", "128x256", "--tokens", "1", "--repeats", "1",
                 "--json", str(out)]) == 0
    result = json.loads(out.read_text())["shapes"][0]
    assert result["bytes_per_param"]["ours"] == result["bytes_per_param"]["bnb"]
    errors = result["linear_1"]["rel_error_vs_bf16"]
    assert abs(errors["ours"] - errors["bnb_dequant"]) < 0.01  # same NF4 weights, same error
    assert "other/ours" in capsys.readouterr().out
