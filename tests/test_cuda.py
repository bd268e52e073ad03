"""CUDA paths, run where a GPU is present (skipped on the CPU-only CI machine): the same model,
LoRA, NF4 and engine code on `cuda` must give what it gives on the CPU."""
from __future__ import annotations

import pytest
import torch

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def _adapter(tmp_path, hf_model, name, seed):
    import peft

    torch.manual_seed(seed)
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                             init_lora_weights=False)
    peft_model = peft.get_peft_model(hf_model, config)
    path = tmp_path / name
    peft_model.save_pretrained(path)
    peft_model.unload()
    return path


def test_model_logits_cuda_equal_cpu(llama_dir):
    from lorafleet.models import load_model

    ids = torch.randint(0, 384, (2, 12))
    cpu = load_model(llama_dir)(ids)
    gpu = load_model(llama_dir, device="cuda")(ids.cuda())
    torch.testing.assert_close(gpu.float().cpu(), cpu, atol=1e-3, rtol=1e-3)


def test_nf4_linear_cuda_equal_cpu():
    from lorafleet.quant import quantize_nf4

    weight = torch.randn(256, 128)
    q = quantize_nf4(weight)
    expected = q.dequantize(torch.float32)
    got = quantize_nf4(weight.cuda()).dequantize(torch.float32).cpu()
    torch.testing.assert_close(got, expected)


def test_engine_cuda_equals_cpu(tmp_path, llama_dir):
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).parent))
    from hf_fixtures import make_checkpoint

    from lorafleet.models import load_model, load_tokenizer
    from lorafleet.serve import Engine, EngineConfig, SamplingParams

    hf = make_checkpoint(tmp_path / "base", "llama")
    adapters = {f"a{i}": _adapter(tmp_path, hf, f"a{i}", i) for i in range(3)}
    prompts = [[5, 6, 7, 8], [9, 10, 11], [12, 13, 14, 15, 16], [17, 18]]
    names = ["a0", None, "a1", "a2"]
    params = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)
    results = {}
    for device in ("cpu", "cuda"):
        model = load_model(tmp_path / "base", device=device)
        engine = Engine(model, load_tokenizer(tmp_path / "base"),
                        EngineConfig(num_pages=512, device=device))
        for name, path in adapters.items():
            engine.register_adapter(name, path)
        results[device] = [c.token_ids for c in engine.generate(prompts, names, params)]
    assert results["cuda"] == results["cpu"]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_sgmv_triton_cuda_equals_paged_reference(dtype):
    """The compiled Triton SGMV kernels (tensor-core dots, split-K atomics) on the GPU equal
    the paged reference: mixed ranks up to 64, a 300-row prefill segment among decode rows,
    3 pages per row with a partial last page."""
    pytest.importorskip("triton")
    from lorafleet.serve.lora_ops import lora_delta_paged_reference
    from lorafleet.serve.triton_ops import sgmv_triton, triton_available

    from .serve.test_triton_ops import base_rows, make_module

    device = torch.device("cuda")
    assert triton_available(device)
    runs = [(8, 1), (None, 2), (64, 300), (1, 1), (16, 1), (None, 5), (33, 7), (4, 1)]
    module, pages, num_rows = make_module(320, 200, runs, seed=0, dtype=dtype, hidden=128)
    for name in ("seg_rows", "seg_rank", "seg_scale", "seg_a", "seg_b", "page_ids"):
        setattr(module, name, getattr(module, name).to(device))
    pages = pages.to(device)
    x = torch.randn(num_rows, 320, device=device).to(dtype)
    y = torch.randn(num_rows, 200, device=device).to(dtype)
    expected = y.clone()
    lora_delta_paged_reference(expected, x, pages, module)
    tolerance = dict(atol=1e-4, rtol=1e-4) if dtype == torch.float32 else dict(atol=2e-2,
                                                                                 rtol=1e-2)
    for split_k in (None, 1):
        got = y.clone()
        sgmv_triton(got, x, pages, module, split_k=split_k)
        torch.testing.assert_close(got.float(), expected.float(), **tolerance)
        rows = base_rows(module, num_rows)
        assert rows and torch.equal(got[rows], y[rows])
