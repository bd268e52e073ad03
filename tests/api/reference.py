"""Greedy references the server's outputs are compared with: transformers + peft (the oracle),
independent of our engine."""
from __future__ import annotations

from functools import lru_cache
from pathlib import Path

import torch


class GreedyOracle:
    """Greedy continuation of token ids by the transformers model, bare or with a PEFT adapter
    loaded by peft itself. Stops at EOS like the engine does."""

    def __init__(self, base_dir: Path, adapter_paths: dict[str, Path], eos_token_id: int = 1):
        self.base_dir, self.adapter_paths, self.eos = base_dir, adapter_paths, eos_token_id
        self._cache = {}

    def _model(self, adapter):
        if adapter not in self._cache:
            import peft
            import transformers
            model = transformers.AutoModelForCausalLM.from_pretrained(
                self.base_dir, dtype=torch.float32).eval()
            if adapter is not None:
                model = peft.PeftModel.from_pretrained(model, self.adapter_paths[adapter]).eval()
            self._cache[adapter] = model
        return self._cache[adapter]

    @torch.no_grad()
    def __call__(self, prompt_ids: list[int], adapter: str | None, max_tokens: int) -> list[int]:
        model = self._model(adapter)
        ids = torch.tensor([prompt_ids])
        out = []
        for _ in range(max_tokens):
            logits = model(input_ids=ids).logits[0, -1]
            token = int(torch.argmax(logits))
            if token == self.eos:
                break  # EOS ends the completion and is not part of it (as in the engine)
            out.append(token)
            ids = torch.cat([ids, torch.tensor([[token]])], dim=1)
        return out

    @torch.no_grad()
    def log_softmax(self, token_ids: list[int], adapter: str | None) -> torch.Tensor:
        """log p(next token | token_ids[:t + 1]) for every position t: [T, V] float32."""
        return self._model(adapter)(input_ids=torch.tensor([token_ids])).logits[0].log_softmax(-1)
