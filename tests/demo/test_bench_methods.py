"""bench methods: the paper-section writer, and one row end to end on a tiny model."""
import json

import pytest

from lorafleet.bench import methods


def test_write_paper_section_replaces_only_the_block(tmp_path):
    paper = tmp_path / "paper.md"
    paper.write_text(f"intro\n{methods.PAPER_BEGIN}\nold\n{methods.PAPER_END}\noutro\n")
    rows = {"methods": [{"label": "LoRA q,v r=8", "trainable": 26624, "bleu": 16.4,
                         "train_loss": 2.38, "peak_rss_mb": 1072, "state_mb": 19.0,
                         "ms_per_step": 140, "train_s": 17},
                        {"label": "prefix", "error": "boom"}]}
    common = {"steps": 120, "batch_size": 8, "n_test": 12}
    methods.write_paper_section(paper, rows, common, "lorafleet bench methods")
    text = paper.read_text()
    assert text.startswith("intro\n") and text.endswith("\noutro\n") and "old" not in text
    assert "| LoRA q,v r=8 | 26,624 | 16.4 |" in text and "failed: boom" in text


@pytest.mark.slow
def test_one_row_end_to_end(llama_dir, tmp_path, capsys):
    from lorafleet.cli import main

    out = tmp_path / "r.json"
    assert main(["bench", "methods", "--quick", "--base", str(llama_dir), "--only", "q,v r=1",
                 "--skip-matrices", "--work", str(tmp_path / "w"), "--json", str(out)]) == 0
    row = json.loads(out.read_text())["results"]["methods"][0]
    assert row["label"] == "LoRA q,v r=1" and row["trainable"] == 2 * ((64 + 64) + (64 + 32))  # 2 layers; GQA v_proj out 32
    assert row["peak_rss_mb"] > 50 and 0.0 <= row["bleu"] <= 100.0
    assert (tmp_path / "w" / "runs" / "lora-q-v-r-1" / "adapter" / "adapter_config.json").is_file()
