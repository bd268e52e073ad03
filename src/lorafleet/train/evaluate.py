"""Evaluate several adapters (and the base) on one data file: next-token loss and perplexity on
the label tokens, exactly as training counts them, and optionally task metrics from greedy
completions of each prompt (exact match, chrF).

An adapter is a PEFT folder (what `lorafleet train` writes as OUT/adapter and inside every
checkpoint) or any method's artifact with a method.json; the name `base` means no adapter.
"""
from __future__ import annotations

import logging
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from lorafleet.errors import ConfigError
from lorafleet.train.data import DataConfig, load_dataset, read_jsonl, DataStats
from lorafleet.train.sources import converter
from lorafleet.train.trainer import count_targets, evaluate, perplexity

logger = logging.getLogger(__name__)

BASE = "base"


@dataclass
class EvalResult:
    adapter: str
    loss: float
    perplexity: float
    tokens: int              # label tokens the loss is averaged over
    examples: int
    exact_match: float | None = None   # fraction of completions equal to the reference
    chrf: float | None = None          # corpus chrF (sacrebleu), 0..100

    def to_json(self) -> dict:
        return asdict(self)


def load_for_eval(model_path: str, adapter: str, dtype, device) -> torch.nn.Module:
    """A fresh base with `adapter` applied (`base`: none)."""
    from lorafleet.models import load_model
    from lorafleet.train.methods import METHOD_FILE, load_trained
    model = load_model(model_path, dtype=dtype, device=device)
    if adapter == BASE:
        return model.eval()
    path = Path(adapter)
    if (path / METHOD_FILE).is_file():
        return load_trained(model, path).eval()
    if (path / "adapter_config.json").is_file():
        import lorafleet
        lorafleet.load_adapter(model, path, adapter_name="default")
        return model.eval()
    raise ConfigError(f"{adapter}: not an adapter folder (no adapter_config.json or "
                      f"{METHOD_FILE}); give a PEFT folder, a run's adapter/ or checkpoint's "
                      f"adapter/, or `base`")


def prompts_and_references(data: DataConfig, tokenizer) -> list[tuple[list[int], str]]:
    """(prompt ids, reference text) per record: prompt/completion records, and conversations
    whose last turn is the assistant's (the prompt is everything before it)."""
    pairs = []
    records = read_jsonl(data.path, data.skip_bad_lines, DataStats(),
                         converter(data.format, data.columns))
    for _, record in records:
        if "completion" in record:
            pairs.append((list(tokenizer.encode(record["prompt"])) if record["prompt"] else [],
                          record["completion"]))
        elif "messages" in record and record["messages"][-1]["role"] == "assistant":
            prompt = tokenizer.apply_chat_template(record["messages"][:-1],
                                                   add_generation_prompt=True)
            ids = tokenizer.encode(prompt, add_special_tokens=False) \
                if isinstance(prompt, str) else list(prompt)
            pairs.append((ids, record["messages"][-1]["content"]))
    return pairs


@torch.no_grad()
def task_metrics(model, pairs, tokenizer, max_new_tokens: int) -> tuple[float, float]:
    """Greedy completion of each prompt -> (exact match, chrF) against the references."""
    import sacrebleu

    from lorafleet.models.generate import generate
    from lorafleet.models.sampling import SamplingParams
    predictions = []
    for ids, _ in pairs:
        out = generate(model, ids or [tokenizer.bos_token_id or 0], max_new_tokens,
                       SamplingParams(temperature=0.0), tokenizer=tokenizer)
        predictions.append(out.text or "")
    references = [ref for _, ref in pairs]
    exact = sum(p.strip() == r.strip() for p, r in zip(predictions, references))
    chrf = sacrebleu.corpus_chrf([p.strip() for p in predictions],
                                 [[r.strip() for r in references]]).score
    return exact / max(1, len(pairs)), chrf


def evaluate_adapters(model_path: str, data: DataConfig, adapters: list[str], *,
                      batch_size: int = 8, dtype=torch.float32, device="cpu",
                      generate: bool = False, max_new_tokens: int = 64,
                      progress=None) -> list[EvalResult]:
    """One EvalResult per adapter, in order; the data is tokenized once."""
    from lorafleet.models import load_tokenizer
    tokenizer = load_tokenizer(model_path)
    examples, _, stats = load_dataset(data, tokenizer)
    pairs = prompts_and_references(data, tokenizer) if generate else []
    if generate and not pairs:
        raise ConfigError(f"{data.path}: task metrics need prompt/completion records or "
                          "conversations ending with an assistant turn")
    pad_id = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else 0
    device = torch.device(device)
    results = []
    for adapter in adapters:
        model = load_for_eval(model_path, adapter, dtype, device)
        loss = evaluate(model, examples, batch_size, pad_id, device)
        result = EvalResult(adapter, loss, perplexity(loss), count_targets(examples),
                            len(examples))
        if generate:
            result.exact_match, result.chrf = task_metrics(model, pairs, tokenizer,
                                                           max_new_tokens)
        results.append(result)
        if progress:
            progress(result)
        del model
    return results
