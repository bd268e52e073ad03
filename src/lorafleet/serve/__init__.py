"""The S-LoRA serving engine: unified page pool, adapter cache, batched heterogeneous LoRA,
paged attention, continuous batching. See docs/engine.md."""
from .async_engine import AsyncEngine
from .engine import Completion, Engine, EngineConfig, RequestOutput, SamplingParams

__all__ = ["AsyncEngine", "Completion", "Engine", "EngineConfig", "RequestOutput", "SamplingParams"]
