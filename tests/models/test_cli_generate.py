"""`lorafleet generate` end to end on a checkpoint folder."""
import copy
import json

import pytest
import torch

from lorafleet.cli import main
from lorafleet.models import load_tokenizer

from .conftest import CHECKPOINTS


def run_json(capsys, *argv):
    assert main(["generate", *argv, "--json"]) == 0
    return json.loads(capsys.readouterr().out)


@pytest.mark.parametrize("name", list(CHECKPOINTS))
def test_generate_greedy_matches_transformers(checkpoints, capsys, name):
    from transformers import AutoModelForCausalLM
    model_dir = checkpoints(name)[0]
    ref = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    tok = load_tokenizer(model_dir)
    out = run_json(capsys, "--model", str(model_dir), "--prompt", "the quick brown",
                   "--max-tokens", "10", "--ignore-eos")
    prompt = torch.tensor([tok.encode("the quick brown")])
    expected = ref.generate(prompt, max_new_tokens=10, do_sample=False, min_new_tokens=10)
    assert out["token_ids"] == expected[0, prompt.shape[1]:].tolist()
    assert out["text"] == tok.decode(out["token_ids"])
    assert main(["generate", "--model", str(model_dir), "--prompt", "to be",
                 "--max-tokens", "3", "--ignore-eos"]) == 0
    assert capsys.readouterr().out.strip() != ""


def test_generate_chat_sampling_adapter_and_nf4(llama_dir, tmp_path, capsys):
    peft = pytest.importorskip("peft")
    from transformers import AutoModelForCausalLM
    ref = AutoModelForCausalLM.from_pretrained(llama_dir)
    torch.manual_seed(0)
    hf = peft.get_peft_model(copy.deepcopy(ref), peft.LoraConfig(
        r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    hf.save_pretrained(tmp_path / "adapter")
    common = ["--model", str(llama_dir), "--prompt", "name : the", "--max-tokens", "8",
              "--ignore-eos", "--chat"]
    tok = load_tokenizer(llama_dir)
    prompt = torch.tensor([tok.apply_chat_template([{"role": "user", "content": "name : the"}],
                                                   tokenize=True)])
    with_adapter = run_json(capsys, *common, "--adapter", str(tmp_path / "adapter"))
    expected = hf.generate(input_ids=prompt, max_new_tokens=8, do_sample=False, min_new_tokens=8)
    assert with_adapter["token_ids"] == expected[0, prompt.shape[1]:].tolist()
    assert with_adapter["prompt_tokens"] == prompt.shape[1]
    sampled = [run_json(capsys, *common, "--temperature", "1.0", "--seed", "5", "--top-k", "20")
               for _ in range(2)]
    assert sampled[0] == sampled[1] and len(sampled[0]["token_ids"]) == 8
    nf4 = run_json(capsys, *common, "--quantize", "nf4", "--dtype", "bf16")
    assert len(nf4["token_ids"]) == 8


def test_generate_bad_model_folder(tmp_path, capsys):
    assert main(["generate", "--model", str(tmp_path), "--prompt", "x"]) == 1
    assert "config.json" in capsys.readouterr().err
