"""The Python example of docs/adapters.md runs as written (on a small random Llama)."""
import re
from pathlib import Path

import torch
from lora_helpers import hf_model

DOC = Path(__file__).parents[2] / "docs" / "adapters.md"


def test_docs_example_runs(llama_dir, tmp_path, monkeypatch):
    code = re.search(r"```python\n(.*?)```", DOC.read_text(), re.S).group(1)
    monkeypatch.chdir(tmp_path)
    scope = {"model": hf_model(llama_dir), "base": hf_model(llama_dir)}
    exec(compile(code, str(DOC), "exec"), scope)
    assert (tmp_path / "out" / "task1" / "adapter_model.safetensors").is_file()
    q = scope["base"].model.layers[0].self_attn.q_proj
    assert q.adapter_names == ["task1"] and torch.count_nonzero(q.lora_B["task1"].weight) == 0
