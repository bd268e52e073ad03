"""GPT-2 (Radford et al. 2019), nanoGPT-style, with Hugging Face's module names
(`transformer.h.0.attn.c_attn`, ...) and its `Conv1D` projections (weight [in, out]), so
checkpoints and PEFT adapters (`fan_in_fan_out: true`) load unchanged.
"""
from __future__ import annotations

import torch
from torch import nn

from .batch import ForwardBatch, project
from .config import ModelConfig
from .layers import activation, attend
from .llama import default_batch


class Conv1D(nn.Module):
    """A linear layer with its weight stored transposed: weight [in, out], bias [out].
    `y = x @ weight + bias`. GPT-2 checkpoints store c_attn / c_proj / c_fc this way."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.weight = nn.Parameter(torch.empty(in_features, out_features))
        self.bias = nn.Parameter(torch.zeros(out_features)) if bias else None
        nn.init.normal_(self.weight, std=0.02)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape[:-1] + (self.out_features,)
        x2d = x.reshape(-1, self.in_features)
        y = x2d @ self.weight if self.bias is None else torch.addmm(self.bias, x2d, self.weight)
        return y.view(shape)

    # transformers' Conv1D names: nf = out features, nx = in features (LoRA layers detect a
    # Conv1D, PEFT's fan_in_fan_out case, by these).
    @property
    def nf(self) -> int:
        return self.out_features

    @property
    def nx(self) -> int:
        return self.in_features

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}"


class GPT2Attention(nn.Module):
    def __init__(self, config: ModelConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.n_heads, self.head_dim = config.num_attention_heads, config.head_dim
        hidden = config.hidden_size
        self.c_attn = Conv1D(hidden, 3 * hidden)  # fused q, k, v
        self.c_proj = Conv1D(hidden, hidden)
        self.scale = self.head_dim ** -0.5 if config.scale_attn_weights else 1.0
        if config.scale_attn_by_inverse_layer_idx:
            self.scale /= layer_idx + 1

    def forward(self, x: torch.Tensor, batch: ForwardBatch) -> torch.Tensor:
        B, T, C = x.shape
        qkv = project(self.c_attn, x, batch.lora)
        q, k, v = (t.view(B, T, self.n_heads, self.head_dim) for t in qkv.split(C, dim=2))
        y = attend(self.layer_idx, q, k, v, self.scale, batch.attention)  # [B, T, H, D]
        return project(self.c_proj, y.reshape(B, T, C), batch.lora)


class GPT2MLP(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.c_fc = Conv1D(config.hidden_size, config.intermediate_size)
        self.c_proj = Conv1D(config.intermediate_size, config.hidden_size)
        self.act = activation(config.hidden_act)

    def forward(self, x: torch.Tensor, lora) -> torch.Tensor:
        return project(self.c_proj, self.act(project(self.c_fc, x, lora)), lora)


class GPT2Block(nn.Module):
    def __init__(self, config: ModelConfig, layer_idx: int):
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.hidden_size, eps=config.norm_eps)
        self.attn = GPT2Attention(config, layer_idx)
        self.ln_2 = nn.LayerNorm(config.hidden_size, eps=config.norm_eps)
        self.mlp = GPT2MLP(config)

    def forward(self, x: torch.Tensor, batch: ForwardBatch) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x), batch)
        return x + self.mlp(self.ln_2(x), batch.lora)


class GPT2Transformer(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.wte = nn.Embedding(config.vocab_size, config.hidden_size)
        self.wpe = nn.Embedding(config.max_position_embeddings, config.hidden_size)
        self.h = nn.ModuleList(GPT2Block(config, i) for i in range(config.num_hidden_layers))
        self.ln_f = nn.LayerNorm(config.hidden_size, eps=config.norm_eps)


class GPT2(nn.Module):
    """GPT-2 causal LM. `forward(input_ids [B, T], batch) -> logits [B, T, vocab]`."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.transformer = GPT2Transformer(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        if config.tie_word_embeddings:
            self.tie_weights()

    def tie_weights(self) -> None:
        self.lm_head.weight = self.transformer.wte.weight

    def forward(self, input_ids: torch.Tensor | None, batch: ForwardBatch | None = None, *,
                inputs_embeds: torch.Tensor | None = None,
                logits_indices: torch.Tensor | None = None) -> torch.Tensor:
        """Same contract as `Llama.forward`."""
        x = self.transformer.wte(input_ids) if inputs_embeds is None else inputs_embeds
        batch = default_batch(x, batch)
        x = x + self.transformer.wpe(batch.positions)
        for block in self.transformer.h:
            x = block(x, batch)
        if logits_indices is not None:
            x = x[:, logits_indices]
        return project(self.lm_head, self.transformer.ln_f(x), batch.lora)
