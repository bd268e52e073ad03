"""The Llama family (Llama 2/3, Mistral, Qwen2) in one file.

Module names equal Hugging Face's (`model.layers.0.self_attn.q_proj`, `model.norm`, `lm_head`),
so checkpoint keys and PEFT adapter keys map 1:1. Every projection is called through
`project(module, x, lora)` so a LoRA layer (or the serving engine's batched one) receives the
batch's adapter metadata.
"""
from __future__ import annotations

import torch
from torch import nn

from .batch import ForwardBatch, project
from .config import ModelConfig
from .layers import RMSNorm, Rotary, activation, apply_rope, attend


class LlamaAttention(nn.Module):
    def __init__(self, config: ModelConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.n_heads, self.n_kv_heads = config.num_attention_heads, config.num_key_value_heads
        self.head_dim = config.head_dim
        self.scale = self.head_dim ** -0.5
        hidden, q_dim, kv_dim = config.hidden_size, self.n_heads * self.head_dim, \
            self.n_kv_heads * self.head_dim
        self.q_proj = nn.Linear(hidden, q_dim, bias=config.qkv_bias)
        self.k_proj = nn.Linear(hidden, kv_dim, bias=config.qkv_bias)
        self.v_proj = nn.Linear(hidden, kv_dim, bias=config.qkv_bias)
        self.o_proj = nn.Linear(q_dim, hidden, bias=config.o_bias)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                batch: ForwardBatch) -> torch.Tensor:
        B, T, _ = x.shape
        lora = batch.lora
        q = project(self.q_proj, x, lora).view(B, T, self.n_heads, self.head_dim)
        k = project(self.k_proj, x, lora).view(B, T, self.n_kv_heads, self.head_dim)
        v = project(self.v_proj, x, lora).view(B, T, self.n_kv_heads, self.head_dim)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        y = attend(self.layer_idx, q, k, v, self.scale, batch.attention)  # [B, T, H, D]
        return project(self.o_proj, y.reshape(B, T, self.n_heads * self.head_dim), lora)


class LlamaMLP(nn.Module):
    """SwiGLU: down(act(gate(x)) * up(x))."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        hidden, inner, bias = config.hidden_size, config.intermediate_size, config.mlp_bias
        self.gate_proj = nn.Linear(hidden, inner, bias=bias)
        self.up_proj = nn.Linear(hidden, inner, bias=bias)
        self.down_proj = nn.Linear(inner, hidden, bias=bias)
        self.act = activation(config.hidden_act)

    def forward(self, x: torch.Tensor, lora) -> torch.Tensor:
        gated = self.act(project(self.gate_proj, x, lora)) * project(self.up_proj, x, lora)
        return project(self.down_proj, gated, lora)


class LlamaDecoderLayer(nn.Module):
    def __init__(self, config: ModelConfig, layer_idx: int):
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.norm_eps)
        self.self_attn = LlamaAttention(config, layer_idx)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.norm_eps)
        self.mlp = LlamaMLP(config)

    def forward(self, x, cos, sin, batch: ForwardBatch) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, batch)
        return x + self.mlp(self.post_attention_layernorm(x), batch.lora)


class LlamaModel(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(LlamaDecoderLayer(config, i)
                                    for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.norm_eps)
        self.rotary_emb = Rotary(config.head_dim, config.rope_theta, config.rope_scaling)


class Llama(nn.Module):
    """A Llama-family causal LM. `forward(input_ids [B, T], batch) -> logits [B, T, vocab]`."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.model = LlamaModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        if config.tie_word_embeddings:
            self.tie_weights()

    def tie_weights(self) -> None:
        self.lm_head.weight = self.model.embed_tokens.weight

    def forward(self, input_ids: torch.Tensor | None, batch: ForwardBatch | None = None, *,
                inputs_embeds: torch.Tensor | None = None,
                logits_indices: torch.Tensor | None = None) -> torch.Tensor:
        """input_ids [B, T] (or inputs_embeds [B, T, hidden]) -> logits [B, T, vocab] in the
        model's dtype. `logits_indices` [N] selects the token positions (along T) whose logits
        are computed (generation and serving only need each sequence's last token)."""
        x = self.model.embed_tokens(input_ids) if inputs_embeds is None else inputs_embeds
        batch = default_batch(x, batch)
        cos, sin = self.model.rotary_emb(batch.positions, x.dtype)
        for layer in self.model.layers:
            x = layer(x, cos, sin, batch)
        if logits_indices is not None:
            x = x[:, logits_indices]
        return project(self.lm_head, self.model.norm(x), batch.lora)


def default_batch(x: torch.Tensor, batch: ForwardBatch | None) -> ForwardBatch:
    """No batch means training-style causal attention over positions 0..T-1."""
    if batch is not None:
        return batch
    B, T = x.shape[:2]
    positions = torch.arange(T, device=x.device).expand(B, T)
    return ForwardBatch(positions=positions)
