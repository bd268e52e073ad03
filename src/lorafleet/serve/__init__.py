"""The S-LoRA serving engine: unified page pool, adapter cache, batched heterogeneous LoRA,
paged attention, continuous batching. See docs/engine.md."""
from .engine import Completion, Engine, EngineConfig, RequestOutput, SamplingParams

__all__ = ["Completion", "Engine", "EngineConfig", "RequestOutput", "SamplingParams"]
