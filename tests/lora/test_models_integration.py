"""LoRA on lorafleet's own models: per-row adapters through `ForwardBatch.lora` equal PEFT's
mixed-batch forward (`adapter_names=`) on the transformers model."""
import warnings

import peft
import torch
from .lora_helpers import hf_model, ids_for, logits, peft_random

import lorafleet as lf
from lorafleet.models import load_model
from lorafleet.models.batch import ForwardBatch


def test_per_row_forward_batch_matches_peft(llama_dir, tmp_path):
    oracle = peft_random(llama_dir, "a", r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"])
    torch.manual_seed(7)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        oracle.add_adapter("b", peft.LoraConfig(r=2, lora_alpha=8, init_lora_weights=False,
                                                target_modules=["k_proj", "up_proj"]))
    oracle.save_pretrained(tmp_path)
    model = load_model(llama_dir)
    for name in ("a", "b"):
        lf.load_adapter(model, tmp_path / name, adapter_name=name)
    ids, rows = ids_for(batch=4), ["b", None, "a", "b"]
    expected = logits(oracle.eval(), ids, adapter_names=[r or "__base__" for r in rows])
    T = ids.shape[1]
    batch = ForwardBatch(positions=torch.arange(T).expand(len(rows), T), lora=rows)
    with torch.no_grad():
        got = model(ids, batch)
        with lf.row_adapters(model, rows):
            got_ctx = model(ids)
    assert (expected[0] - logits(hf_model(llama_dir), ids)[0]).abs().max() > 1e-2
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=0)
    torch.testing.assert_close(got_ctx, expected, atol=1e-4, rtol=0)
