"""Megatron-style sharding of a loaded Llama-family model, and of adapters in page form, for
tensor-parallel serving (parallel.py; S-LoRA sec. 6).

Rank r of N keeps (heads split in contiguous groups, GQA: KV heads replicated when N > n_kv):

    q_proj, k_proj, v_proj, gate_proj, up_proj   column-parallel: its rows of W (output
                                                 features) and of the bias
    o_proj, down_proj                            row-parallel: its columns of W (input
                                                 features); outputs are all-reduced, the bias
                                                 is added once, after the all-reduce
    norms                                        replicated
    embed_tokens, lm_head                        replicated, or split by vocabulary rows
                                                 (EngineConfig.tensor_parallel_vocab, below)

LoRA follows the base (S-LoRA sec. 6, vLLM's default, not `--fully-sharded-loras`):
column-parallel: A [r, in] replicated, B [out, r] split by output rows like W, so each rank's
delta lands on its own output columns; row-parallel: A split by input columns like W, B
replicated, so each rank's delta is a partial sum that the base's all-reduce adds up (the
forward hook runs after the shell has added the delta). Neither adds a collective.

Vocabulary split (Megatron's VocabParallelEmbedding and parallel lm_head), rank r holds rows
[r * ceil(V/N), ...): "lm_head": each rank computes its slice of the logits and rank 0 gathers
them (one gather of rows x V numbers per step; replicated, rank 0 alone computes the whole
lm_head while the workers wait); "sharded": the embedding too: a token outside a rank's rows
looks up zeros and one all-reduce of [T, H] per step sums the one rank's row (1/N of the
embedding's memory per rank, one more collective). Adapters never target either (the output
head is excluded from adapter layouts).

Adapter pages keep the unsharded layout (page counts and offsets from the full shapes, so the
scheduler's page ids mean the same on every rank); a rank writes its shard at the start of each
row's pages, zero-padded. That costs up to (1 - 1/N) of the split parts' pages: simple first.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Callable

import torch
from torch import nn

from lorafleet.errors import ConfigError

from .engine_config import check_vocab_mode
from .kv_cache import cdiv
from .runner import wrap_projections

COLUMN, ROW = "column", "row"
ATTENTION = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP = ("gate_proj", "up_proj", "down_proj")


@dataclass(frozen=True)
class Shard:
    """A rank's part of one projection: features [start, end) of its output (column) or of its
    input (row)."""
    kind: str
    start: int
    end: int


def check_tensor_parallel(config, world: int) -> None:
    """ConfigError naming the field when the model cannot be split `world` ways."""
    if world < 1:
        raise ConfigError(f"tensor_parallel_size must be >= 1, got {world}")
    if world == 1:
        return
    if config.family != "llama":
        raise ConfigError(f"tensor_parallel_size {world}: only the Llama family (Llama, Mistral, "
                          f"Qwen2) is sharded; {config.family} (GPT-2's fused c_attn) is not")
    heads, kv_heads = config.num_attention_heads, config.num_key_value_heads
    if heads % world:
        raise ConfigError(f"tensor_parallel_size {world} does not divide num_attention_heads "
                          f"{heads}")
    if kv_heads % world and world % kv_heads:
        raise ConfigError(f"tensor_parallel_size {world} and num_key_value_heads {kv_heads}: "
                          f"one must divide the other (KV heads are split, or replicated)")
    if config.intermediate_size % world:
        raise ConfigError(f"tensor_parallel_size {world} does not divide intermediate_size "
                          f"{config.intermediate_size}")


def shard_plan(config, rank: int, world: int) -> dict[str, Shard]:
    """Module name -> this rank's Shard, for every projection that is split."""
    hd = config.head_dim
    q_local = config.num_attention_heads // world * hd
    if config.num_key_value_heads >= world:
        kv_local = config.num_key_value_heads // world * hd
        kv_start = rank * kv_local
    else:          # fewer KV heads than ranks: each rank holds the one its query heads read
        kv_local = hd
        kv_start = rank * config.num_key_value_heads // world * hd
    inner = config.intermediate_size // world
    plan = {}
    for i in range(config.num_hidden_layers):
        attn, mlp = f"model.layers.{i}.self_attn.", f"model.layers.{i}.mlp."
        plan[attn + "q_proj"] = Shard(COLUMN, rank * q_local, (rank + 1) * q_local)
        plan[attn + "k_proj"] = Shard(COLUMN, kv_start, kv_start + kv_local)
        plan[attn + "v_proj"] = Shard(COLUMN, kv_start, kv_start + kv_local)
        plan[attn + "o_proj"] = Shard(ROW, rank * q_local, (rank + 1) * q_local)
        plan[mlp + "gate_proj"] = Shard(COLUMN, rank * inner, (rank + 1) * inner)
        plan[mlp + "up_proj"] = Shard(COLUMN, rank * inner, (rank + 1) * inner)
        plan[mlp + "down_proj"] = Shard(ROW, rank * inner, (rank + 1) * inner)
    return plan


def vocab_shard(vocab_size: int, rank: int, world: int) -> Shard:
    """Rank `rank`'s rows of the embedding / lm_head: ceil(V / N) each, the last fewer."""
    per = cdiv(vocab_size, world)
    start = min(rank * per, vocab_size)
    return Shard(COLUMN, start, min(start + per, vocab_size))


class VocabParallelEmbedding(nn.Module):
    """Rows [start, end) of an embedding: other ids look up zeros, and the all-reduce adds the
    one rank's row of each token into every rank's [B, T, H]."""

    def __init__(self, weight: torch.Tensor, start: int,
                 all_reduce: Callable[[torch.Tensor], None]):
        super().__init__()
        self.weight = nn.Parameter(weight, requires_grad=False)     # [end - start, H]
        self.start, self.all_reduce = start, all_reduce

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        local = input_ids - self.start
        outside = (local < 0) | (local >= self.weight.shape[0])
        out = nn.functional.embedding(local.masked_fill(outside, 0), self.weight)
        out = out.masked_fill(outside.unsqueeze(-1), 0).contiguous()
        self.all_reduce(out)
        return out


def _gather_logits_hook(gather: Callable[[torch.Tensor], list | None], vocab_size: int,
                        world: int):
    """lm_head's forward hook: its [B, N, rows] slice -> rank 0 gets [B, N, V] (slices padded
    to ceil(V / N) for the gather, cut after); other ranks keep their slice (unused)."""
    per = cdiv(vocab_size, world)

    def hook(module, args, output):
        if output.shape[-2] == 0:        # no row samples this step: every rank skips alike
            return output.new_empty(*output.shape[:-1], vocab_size)
        if output.shape[-1] < per:
            output = nn.functional.pad(output, (0, per - output.shape[-1]))
        parts = gather(output.contiguous())
        return output if parts is None else torch.cat(parts, dim=-1)[..., :vocab_size]
    return hook


def local_config(config, world: int):
    """The model config as rank-local code sees it (head counts, MLP width)."""
    kv = max(1, config.num_key_value_heads // world)
    return replace(config, num_attention_heads=config.num_attention_heads // world,
                   num_key_value_heads=kv, head_dim=config.head_dim,
                   intermediate_size=config.intermediate_size // world)


def _sliced_linear(linear: nn.Module, name: str, shard: Shard) -> tuple[nn.Linear, torch.Tensor]:
    """(this rank's nn.Linear, the bias a row-parallel layer adds after the all-reduce)."""
    if type(linear) is not nn.Linear:
        raise ConfigError(f"tensor parallelism: {name} is a {type(linear).__name__}; only plain "
                          f"nn.Linear projections are sharded (a 4-bit base is not yet)")
    weight, bias = linear.weight.detach(), linear.bias
    bias = None if bias is None else bias.detach()
    if shard.kind == COLUMN:
        weight = weight[shard.start:shard.end]
        local_bias = None if bias is None else bias[shard.start:shard.end].clone()
        after = None
    else:
        weight = weight[:, shard.start:shard.end]
        local_bias, after = None, bias
    out = nn.Linear(weight.shape[1], weight.shape[0], bias=local_bias is not None,
                    device=weight.device, dtype=weight.dtype)
    with torch.no_grad():
        out.weight.copy_(weight)
        if local_bias is not None:
            out.bias.copy_(local_bias)
    out.requires_grad_(False)
    return out, after


def shard_model(model: nn.Module, rank: int, world: int,
                all_reduce: Callable[[torch.Tensor], None],
                quantize: str | None = None, vocab: str = "replicated",
                gather: Callable[[torch.Tensor], list | None] | None = None
                ) -> dict[str, tuple[int, int]]:
    """Cut `model` (a loaded Llama-family model, in place) down to rank `rank`'s shard: its
    projections sliced, attention modules given local head counts, `model.config` replaced by
    the local view, and row-parallel projections wrapped (runner.wrap_projections) with a
    forward hook that all-reduces the output (base + LoRA delta) and then adds the bias.
    quantize "nf4": then the shard's projections (not lm_head) are quantized (QLoRA's NF4), so
    each rank quantizes only its own part. vocab (engine_config.VOCAB_MODES): "lm_head" /
    "sharded" split the lm_head / also the embedding by vocabulary rows; `gather` then brings
    the logits to rank 0.
    Returns the unsharded targets (name -> (in, out)): adapters are checked against them."""
    config = model.config
    check_tensor_parallel(config, world)
    check_vocab_mode(vocab)
    full_targets = {name: (m.in_features, m.out_features) for name, m in model.named_modules()
                    if isinstance(m, nn.Linear)}
    plan = shard_plan(config, rank, world)
    rows = vocab_shard(config.vocab_size, rank, world)
    if vocab != "replicated" and world > 1:
        model.lm_head = _sliced_linear(model.lm_head, "lm_head", rows)[0]
    if vocab == "sharded" and world > 1:
        table = model.model.embed_tokens.weight.detach()[rows.start:rows.end].clone()
        model.model.embed_tokens = VocabParallelEmbedding(table, rows.start, all_reduce)
    row_bias = {}
    for name, shard in plan.items():
        local, bias = _sliced_linear(model.get_submodule(name), name, shard)
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent), child, local)
        row_bias[name] = bias
    local = local_config(config, world)
    for layer in model.model.layers:
        layer.self_attn.n_heads = local.num_attention_heads
        layer.self_attn.n_kv_heads = local.num_key_value_heads
    model.config = local
    wrap_projections(model)
    if quantize == "nf4":
        from lorafleet.quant import quantize_model
        quantize_model(model)           # the shells' base layers; lm_head kept
    elif quantize is not None:
        raise ConfigError(f"quantize must be 'nf4' or None, got {quantize!r}")
    for name, shard in plan.items():
        if shard.kind == ROW:
            model.get_submodule(name).register_forward_hook(_reduce_hook(all_reduce,
                                                                         row_bias[name]))
    if vocab != "replicated" and world > 1:
        model.lm_head.register_forward_hook(_gather_logits_hook(gather, config.vocab_size,
                                                                world))
    return full_targets


def _reduce_hook(all_reduce: Callable[[torch.Tensor], None], bias: torch.Tensor | None):
    def hook(module, args, output):
        output = output.contiguous()
        all_reduce(output)
        return output if bias is None else output + bias
    return hook


def shard_pages(modules: dict, pages: torch.Tensor, plans: list[dict[str, Shard]]
                ) -> torch.Tensor:
    """An adapter's pages in the unsharded layout `[n, H]` (adapter_registry.ModuleSlice per
    module in `modules`) -> every rank's pages side by side `[n, N * H]`: rank r's are columns
    [r * H, (r + 1) * H). Rank r's row of a split matrix (B^T of a column-parallel projection,
    A of a row-parallel one) holds its features first, zero-padded; the rest is unchanged."""
    n, page_size = pages.shape
    world = len(plans)
    out = pages.repeat(1, world).view(n, world, page_size)
    for name, s in modules.items():
        for r, plan in enumerate(plans):
            shard = plan.get(name)
            if shard is None or not s.rank:
                continue
            if shard.kind == COLUMN:      # B^T [rank, out]: keep this rank's output columns
                first, ppr, dim = s.b_page, s.b_pages_per_row, s.out_features
            else:                         # A [rank, in]: keep this rank's input columns
                first, ppr, dim = s.a_page, s.a_pages_per_row, s.in_features
            full = pages[first:first + s.rank * ppr].reshape(s.rank, ppr * page_size)[:, :dim]
            block = torch.zeros(s.rank, ppr * page_size, dtype=pages.dtype)
            block[:, :shard.end - shard.start] = full[:, shard.start:shard.end]
            out[first:first + s.rank * ppr, r] = block.view(s.rank * ppr, page_size)
    return out.view(n, world * page_size)


def builder_shapes(local_targets: dict[str, tuple[int, int]],
                   full_targets: dict[str, tuple[int, int]], page_size: int
                   ) -> list[tuple[int, int, int, int]]:
    """Per module (in local_targets' order): (local in, local out, pages per A row, pages per
    B^T row), the pages per row from the unsharded shapes as the adapter pages are laid out."""
    return [(fan_in, fan_out, cdiv(full_targets[name][0], page_size),
             cdiv(full_targets[name][1], page_size))
            for name, (fan_in, fan_out) in local_targets.items()]
