"""The unified page pool (S-LoRA sec. 5.1): one preallocated set of fixed-size pages shared by
the paged KV cache and the weights of every resident adapter.

A page is one vector of the model's hidden size H. This file is only the allocator, plain Python
with no torch import so it is unit-tested on its own; the tensor `[num_pages, H]` that holds the
pages' contents is owned by the runner (`runner.py`), which reads and writes it by page id.

How things map to pages (the two users of the pool):

- KV cache (`kv_cache.py`). One token's key row in one layer is `n_kv_heads * head_dim` numbers,
  which is H for multi-head attention but smaller for grouped-query attention (Llama 3 8B:
  1024 against H = 4096). We *pack* rows: a page holds `H // kv_dim` token rows of one layer's
  K (or V). One page per token per layer zero-padded (the paper's layout) would waste
  `1 - kv_dim / H` of every KV page (75% for Llama 3), and KV is most of the pool, so packing
  is worth its one extra division when computing a slot (`page * rows_per_page + row`).
- Adapters (`adapter_cache.py`). For a target module with `A [r, in]` and `B [out, r]` the
  adapter stores the rank rows of `A` and of `B^T [r, out]`. Each rank row takes
  `ceil(dim / H)` pages (dim = in or out), zero-padded in the last page, so a rank-r adapter
  takes `r * (ceil(in / H) + ceil(out / H))` pages per module: rank-r means r pages per low-rank
  matrix when in = out = H, exactly as in the paper, and no padding to a maximum rank.
"""
from __future__ import annotations

from lorafleet.errors import ConfigError, EngineError

KV = "kv"
ADAPTER = "adapter"


class OutOfPages(EngineError):
    """The pool has fewer free pages than asked for (the caller decides: evict, preempt, wait)."""


class PagePool:
    """A free list of page ids. `alloc(n)` and `free(ids)` are O(n); nothing is ever scanned.

    Pages are counted per owner kind (`kv`, `adapter`) so `stats()` can say how the pool is
    split at this moment; the split is not fixed (that is the point of unified paging).
    """

    def __init__(self, num_pages: int):
        if num_pages <= 0:
            raise ConfigError(f"num_pages must be positive, got {num_pages}")
        self.num_pages = num_pages
        # Popping from the end hands out low page ids first, which keeps tests readable.
        self._free: list[int] = list(range(num_pages - 1, -1, -1))
        self._owner: list[str | None] = [None] * num_pages
        self.used_by = {KV: 0, ADAPTER: 0}

    @property
    def num_free(self) -> int:
        return len(self._free)

    @property
    def num_used(self) -> int:
        return self.num_pages - len(self._free)

    def can_alloc(self, n: int) -> bool:
        return n <= len(self._free)

    def alloc(self, n: int, kind: str) -> list[int]:
        if kind not in self.used_by:
            raise ValueError(f"unknown page owner kind {kind!r}")
        if n > len(self._free):
            raise OutOfPages(f"asked for {n} pages, {len(self._free)} free of {self.num_pages}")
        page_ids = self._free[len(self._free) - n:]
        del self._free[len(self._free) - n:]
        for page in page_ids:
            self._owner[page] = kind
        self.used_by[kind] += n
        return page_ids

    def free(self, page_ids: list[int]) -> None:
        for page in page_ids:
            kind = self._owner[page]
            if kind is None:
                raise EngineError(f"page {page} freed twice")
            self._owner[page] = None
            self.used_by[kind] -= 1
        self._free.extend(page_ids)

    def check(self) -> None:
        """The accounting invariant: free + used == total, per-kind counts add up, no page both
        free and owned. O(pages); tests call it after every step."""
        used = sum(self.used_by.values())
        owned = sum(owner is not None for owner in self._owner)
        if len(self._free) + used != self.num_pages or owned != used:
            raise EngineError(f"page pool accounting broken: free {len(self._free)} + used "
                              f"{used} != total {self.num_pages} (owned {owned})")
        if len(set(self._free)) != len(self._free) or any(
                self._owner[page] is not None for page in self._free):
            raise EngineError("page pool free list holds a duplicate or an owned page")

    def stats(self) -> dict:
        return {"pages_total": self.num_pages, "pages_free": self.num_free,
                "pages_kv": self.used_by[KV], "pages_adapter": self.used_by[ADAPTER]}
