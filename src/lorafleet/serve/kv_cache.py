"""The paged KV cache's bookkeeping: which pool pages hold which sequence's keys and values.

Plain Python (no torch) like the pool it draws from; `attention.py` turns a sequence's pages
into tensor slot indices. Layout (see pool.py for why rows are packed):

- a page holds `rows_per_page = H // kv_dim` token rows of one layer's K or of one layer's V;
- a *block* is the unit a sequence grows by: for each layer and each of K, V it has
  `pages_per_group` pages, so it holds `block_tokens = pages_per_group * rows_per_page` tokens
  of every layer. Its `2 * num_layers * pages_per_group` pages are ordered
  `[(layer, k_or_v), page_in_group]`;
- token i of a sequence sits in block `i // block_tokens`, page
  `(2 * layer + k_or_v) * pages_per_group + (i % block_tokens) // rows_per_page` of that block,
  row `i % rows_per_page` of that page.

Growing a sequence allocates whole blocks from the pool, freeing returns them: O(pages).
"""
from __future__ import annotations

from dataclasses import dataclass

from lorafleet.errors import ConfigError

from .pool import KV, PagePool


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


@dataclass(frozen=True)
class KVLayout:
    num_layers: int
    kv_dim: int          # n_kv_heads * head_dim: one token's key (or value) row in one layer
    page_size: int       # H, the hidden size: the numbers in one page
    block_tokens_hint: int = 16

    def __post_init__(self):
        if self.kv_dim > self.page_size:
            raise ConfigError(f"kv_dim {self.kv_dim} (n_kv_heads * head_dim) is larger than the "
                              f"page size (hidden size) {self.page_size}; unsupported")

    @property
    def rows_per_page(self) -> int:
        return self.page_size // self.kv_dim

    @property
    def pages_per_group(self) -> int:
        return cdiv(self.block_tokens_hint, self.rows_per_page)

    @property
    def block_tokens(self) -> int:
        return self.pages_per_group * self.rows_per_page

    @property
    def pages_per_block(self) -> int:
        return 2 * self.num_layers * self.pages_per_group

    def pages_for_tokens(self, num_tokens: int) -> int:
        return cdiv(num_tokens, self.block_tokens) * self.pages_per_block


class KVCacheManager:
    def __init__(self, pool: PagePool, layout: KVLayout):
        self.pool, self.layout = pool, layout
        self._pages: dict[str, list[int]] = {}   # seq id -> its pages, block after block

    def num_tokens_held(self, seq_id: str) -> int:
        pages = self._pages.get(seq_id, ())
        return len(pages) // self.layout.pages_per_block * self.layout.block_tokens

    def pages_needed(self, seq_id: str, num_tokens: int) -> int:
        """Extra pages for `seq_id` to hold `num_tokens` tokens in all (0 if it already can)."""
        held = len(self._pages.get(seq_id, ()))
        return max(0, self.layout.pages_for_tokens(num_tokens) - held)

    def grow(self, seq_id: str, num_tokens: int) -> None:
        """Make room for `num_tokens` tokens in all; raises pool.OutOfPages if it cannot."""
        extra = self.pages_needed(seq_id, num_tokens)
        pages = self._pages.setdefault(seq_id, [])
        if extra:
            pages.extend(self.pool.alloc(extra, KV))

    def free(self, seq_id: str) -> int:
        pages = self._pages.pop(seq_id, [])
        self.pool.free(pages)
        return len(pages)

    def page_ids(self, seq_id: str) -> list[int]:
        return self._pages[seq_id]

    def __contains__(self, seq_id: str) -> bool:
        return seq_id in self._pages

    def __len__(self) -> int:
        return len(self._pages)
