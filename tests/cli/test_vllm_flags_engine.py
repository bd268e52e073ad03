"""vLLM's serve flags reach the engine with vLLM's meaning: --max-loras (distinct adapters in
one batch), --max-lora-rank (a larger adapter is refused, naming both ranks), --max-cpu-loras
(host cache), --gpu-memory-utilization (the memory budget as a fraction)."""
import pytest

from lorafleet.cli import build_parser
from lorafleet.errors import AdapterError

from ..api.conftest import make_adapters


def _build(llama_dir, *flags):
    from lorafleet.cli.serve import build
    return build(build_parser().parse_args(["serve", "--model", str(llama_dir), "--dtype",
                                            "float32", "--no-progress", *flags]))[0]


def test_vllm_flags_set_the_engine(llama_dir):
    engine = _build(llama_dir, "--num-pages", "256", "--max-loras", "3", "--max-lora-rank",
                    "8", "--max-cpu-loras", "5")
    c = engine.config
    assert (c.max_adapters_per_step, c.max_lora_rank, c.max_cpu_loras) == (3, 8, 5)
    assert engine.scheduler.config.max_adapters_per_step == 3
    from lorafleet.cli.serve import memory_budget     # (not built: a quarter of RAM is big)
    from lorafleet.serve import EngineConfig
    args = build_parser().parse_args(["serve", "--model", "m", "--gpu-memory-utilization",
                                      "0.25"])
    assert memory_budget(args) == pytest.approx(0.25)
    assert EngineConfig(memory_budget=memory_budget(args)).memory_budget == pytest.approx(0.25)


def test_an_adapter_over_max_lora_rank_is_refused(llama_dir, tmp_path):
    paths = make_adapters(llama_dir, tmp_path, ["wide"], r=8)
    with pytest.raises(AdapterError, match=r"8.*max_lora_rank 4"):
        _build(llama_dir, "--num-pages", "256", "--max-lora-rank", "4",
               "--lora-modules", f"wide={paths['wide']}")
    engine = _build(llama_dir, "--num-pages", "256", "--max-lora-rank", "8",
                    "--lora-modules", f"wide={paths['wide']}")
    assert "wide" in engine.adapters()
