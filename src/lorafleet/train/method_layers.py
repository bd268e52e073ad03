"""The modules the baseline methods wrap around a frozen model (train/methods.py applies them):
bottleneck adapters (Houlsby's and Lin's), and the virtual-token wrappers of prefix and prompt
tuning, with prefix tuning's MLP reparameterization (Li & Liang 2021 sec. 4.3)."""
from __future__ import annotations

import torch
from torch import nn

PLACEHOLDER_TOKEN = 0  # any valid id: the wrapped modules overwrite what it produces


class BottleneckAdapter(nn.Module):
    """y = base(x); y + up(gelu(down(y))). up starts at zero so training starts at the base."""

    def __init__(self, base: nn.Module, hidden: int, bottleneck: int, **factory):
        super().__init__()
        self.base_layer = base
        self.down = nn.Linear(hidden, bottleneck, **factory)
        self.up = nn.Linear(bottleneck, hidden, **factory)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)

    def forward(self, x, *args):
        y = self.base_layer(x, *args)
        return y + self.up(nn.functional.gelu(self.down(y)))


class LinAdapter(BottleneckAdapter):
    """y = base(x); y + up(relu(down(LayerNorm(y)))) (Lin et al. 2020). up starts at zero."""

    def __init__(self, base: nn.Module, hidden: int, bottleneck: int, **factory):
        super().__init__(base, hidden, bottleneck, **factory)
        self.norm = nn.LayerNorm(hidden, **factory)

    def forward(self, x, *args):
        y = self.base_layer(x, *args)
        return y + self.up(nn.functional.relu(self.down(self.norm(y))))


class VirtualTokenOutput(nn.Module):
    """Overwrite the output columns [start, start + width) at the first P positions with a
    learned [P, width] tensor. Used for input embeddings (prompt) and k/v projections (prefix)."""

    def __init__(self, base: nn.Module, init: torch.Tensor, start: int = 0):
        super().__init__()
        self.base_layer = base
        self.virtual = nn.Parameter(init)      # [P, width]
        self.start = start

    def learned(self) -> torch.Tensor:         # [P, width]
        return self.virtual

    def forward(self, x, *args):
        y = self.base_layer(x, *args)          # [B, T, out]
        learned = self.learned()
        n_virtual, width = learned.shape
        head = y[:, :n_virtual]
        learned = learned.to(y.dtype).expand(y.shape[0], -1, -1)
        head = torch.cat([head[..., :self.start], learned, head[..., self.start + width:]], -1)
        return torch.cat([head, y[:, n_virtual:]], dim=1)


class PrefixEncoder(nn.Module):
    """Li & Liang's reparameterization: P embedding vectors through Linear -> tanh -> Linear give
    every layer's key/value prefixes at once (PEFT's PrefixEncoder with prefix_projection; same
    layers, default inits and parameter count). Output row block [offset, offset + width) is one
    wrapped projection's prefix; for Llama the blocks run k0, v0, k1, v1, ... as PEFT's do."""

    def __init__(self, n_virtual: int, hidden: int, encoder_hidden: int, total_width: int,
                 **factory):
        super().__init__()
        self.embedding = nn.Embedding(n_virtual, hidden, **factory)
        self.transform = nn.Sequential(nn.Linear(hidden, encoder_hidden, **factory), nn.Tanh(),
                                       nn.Linear(encoder_hidden, total_width, **factory))

    def block(self, offset: int, width: int) -> torch.Tensor:   # [P, width]
        # Each layer asks for its own rows: recomputing the small first layer per call keeps
        # the wrappers stateless (no per-forward cache, so activation checkpointing's recompute
        # and DDP see ordinary modules). P * hidden * encoder_hidden FLOPs per call: negligible.
        first, act, last = self.transform
        h = act(first(self.embedding.weight))
        rows = slice(offset, offset + width)
        return nn.functional.linear(h, last.weight[rows], last.bias[rows])


class ProjectedTokenOutput(VirtualTokenOutput):
    """VirtualTokenOutput whose [P, width] prefix is a row block of a shared PrefixEncoder."""

    def __init__(self, base: nn.Module, encoder: PrefixEncoder, offset: int, width: int,
                 start: int = 0):
        nn.Module.__init__(self)
        self.base_layer = base
        self.start, self.offset, self.width = start, offset, width
        # A list hides the encoder from module registration: it is registered once, on the
        # PrefixProjectionModel, so its parameters have one name and one copy in state_dict.
        self._encoder = [encoder]

    def learned(self) -> torch.Tensor:
        return self._encoder[0].block(self.offset, self.width)


class VirtualTokenModel(nn.Module):
    """Calls `model` with P placeholder tokens in front and returns logits of the real tokens."""

    def __init__(self, model: nn.Module, n_virtual: int):
        super().__init__()
        self.model = model
        self.n_virtual = n_virtual

    def forward(self, input_ids):              # [B, T] -> logits [B, T, vocab]
        pad = input_ids.new_full((input_ids.shape[0], self.n_virtual), PLACEHOLDER_TOKEN)
        out = self.model(torch.cat([pad, input_ids], dim=1))
        logits = out.logits if hasattr(out, "logits") else out
        return logits[:, self.n_virtual:]


class PrefixProjectionModel(VirtualTokenModel):
    """VirtualTokenModel that owns the PrefixEncoder its wrapped projections read from."""

    def __init__(self, model: nn.Module, n_virtual: int, encoder: PrefixEncoder):
        super().__init__(model, n_virtual)
        self.prefix_encoder = encoder
