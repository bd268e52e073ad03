"""A PEFT adapter applied on both sides: transformers + peft (oracle) vs our model with
`lorafleet.load_adapter`, same logits and same greedy generation."""
import copy

import pytest
import torch

import lorafleet
from lorafleet.models import generate, load_model

peft = pytest.importorskip("peft")

ALL_LLAMA = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
TARGETS = {
    "llama_gqa": ALL_LLAMA,
    "llama3_rope_tied": ALL_LLAMA,           # Llama-3 RoPE scaling, tied embeddings, biases
    "llama_sharded": ["q_proj", "o_proj", "down_proj"],  # weights from several shards
    "mistral": ["k_proj", "v_proj", "gate_proj"],
    "qwen2": ["q_proj", "v_proj"],           # qkv bias under the adapter
    "gpt2": ["c_attn", "c_proj", "c_fc"],
}


@pytest.mark.parametrize("name", list(TARGETS))
def test_peft_adapter_matches(checkpoints, tmp_path, name):
    path, ref = checkpoints(name)
    torch.manual_seed(0)
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS[name],
                             init_lora_weights=False,  # random B: the adapter changes outputs
                             fan_in_fan_out=name == "gpt2")
    hf = peft.get_peft_model(copy.deepcopy(ref), config).eval()
    hf.save_pretrained(tmp_path / "adapter")

    model = lorafleet.load_adapter(load_model(path), tmp_path / "adapter", adapter_name="a")
    ids = torch.randint(2, 384, (2, 20), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        expected = hf(input_ids=ids).logits
        base = ref(ids).logits
        got = model(ids, None)  # the active adapter
    assert (expected - base).abs().max() > 1e-2  # the adapter matters
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=0)

    prompt = ids[0, :6]
    hf_out = hf.generate(input_ids=prompt[None], max_new_tokens=16, do_sample=False)[0, 6:]
    hf_out = hf_out.tolist()
    eos = ref.config.eos_token_id
    hf_out = hf_out[:hf_out.index(eos)] if eos in hf_out else hf_out
    assert generate(model, prompt, 16, lora=["a"]).token_ids == hf_out
    assert generate(model, prompt, 16, lora="a").token_ids == hf_out
