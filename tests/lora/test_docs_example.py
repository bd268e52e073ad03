"""The Python example of docs/adapters.md runs as written (on a small random Llama), and what it
produces behaves: the injected model equals the bare base while B = 0, and once B is trained
(here: set non-zero) the saved adapter gives PEFT's outputs, in PEFT and after load_adapter."""
import re
from pathlib import Path

import torch
from .lora_helpers import hf_model, ids_for, logits

DOC = Path(__file__).parents[2] / "docs" / "adapters.md"


def test_docs_example_runs(llama_dir, tmp_path, monkeypatch):
    import peft

    import lorafleet as lf

    code = re.search(r"```python\n(.*?)```", DOC.read_text(), re.S).group(1)
    monkeypatch.chdir(tmp_path)
    scope = {"model": hf_model(llama_dir), "base": hf_model(llama_dir)}
    exec(compile(code, str(DOC), "exec"), scope)
    assert (tmp_path / "out" / "task1" / "adapter_model.safetensors").is_file()
    q = scope["base"].model.layers[0].self_attn.q_proj
    assert q.adapter_names == ["task1"] and torch.count_nonzero(q.lora_B["task1"].weight) == 0

    model, ids, bare = scope["model"], ids_for(), logits(hf_model(llama_dir), ids_for())
    torch.testing.assert_close(logits(model, ids), bare, rtol=0, atol=0)  # B = 0: the base
    torch.manual_seed(0)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.1)
    ours = logits(model, ids)
    assert (ours - bare).abs().max() > 1e-3  # the adapter now changes the outputs
    lf.save_adapter(model, "out/trained")
    oracle = peft.PeftModel.from_pretrained(hf_model(llama_dir), "out/trained").eval()
    torch.testing.assert_close(ours, logits(oracle, ids), rtol=1e-5, atol=1e-5)
    lf.load_adapter(scope["base"], "out/trained", adapter_name="trained")
    lf.set_adapter(scope["base"], "trained")
    torch.testing.assert_close(logits(scope["base"], ids), ours, rtol=1e-5, atol=1e-5)
