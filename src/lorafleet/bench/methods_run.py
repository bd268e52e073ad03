"""One `bench methods` run, in its own child process: train one configuration, then greedily
complete the validation and test prompts and score them with corpus BLEU.

Decoding is greedy and batched over every prompt at once (right padding, exact under causal
attention: each row's result is the one it would get alone). Models whose projections live
inside the base (LoRA, full fine-tuning, BitFit, bottleneck adapters) decode with the KV cache;
prefix and prompt tuning wrap the model with virtual tokens, so they re-run the sequence.
"""
from __future__ import annotations

import json
import os
import time
from pathlib import Path

# The files a parent writes for its children: the e2e data and the two scored splits.
TRAIN_FILE, VAL_FILE, TEST_FILE = "e2e.train.jsonl", "e2e.val.jsonl", "e2e.test.jsonl"


def read_examples(path: Path):
    """TaskExamples (with every reference) from the JSONL the parent wrote."""
    from lorafleet.demo.tasks import TaskExample

    out = []
    for line in path.read_text().splitlines():
        row = json.loads(line)
        out.append(TaskExample(row["prompt"], row["completion"], tuple(row["references"])))
    return out


def write_examples(path: Path, examples) -> None:
    path.write_text("".join(json.dumps({"prompt": e.prompt, "completion": e.completion,
                                        "references": list(e.references)}) + "\n"
                            for e in examples))


def greedy_complete(model, tokenizer, prompt: str, max_tokens: int) -> str:
    """The slow reference: one prompt, the whole sequence re-run for every token. Stops at EOS
    or once the text holds a newline."""
    import torch

    ids = tokenizer.encode(prompt)
    new: list[int] = []
    with torch.inference_mode():
        for _ in range(max_tokens):
            out = model(torch.tensor([ids + new]))
            logits = out.logits if hasattr(out, "logits") else out
            token = int(logits[0, -1].argmax())
            if token == tokenizer.eos_token_id:
                break
            new.append(token)
            if "\n" in tokenizer.decode(new):
                break
    return tokenizer.decode(new)


def _has_kv_path(model) -> bool:
    # our Llama/GPT-2 (possibly with LoRA / adapter / bias modules inside) take a ForwardBatch;
    # the virtual-token wrappers do not
    return hasattr(model, "config") and hasattr(model.config, "num_key_value_heads")


def greedy_batch(model, tokenizer, prompts: list[str], max_tokens: int) -> list[str]:
    """greedy_complete for many prompts at once (the same outputs), in one right-padded batch.

    Causal attention makes this exact: row i's token at position p attends only to positions
    <= p, so the padding after its prompt is never read. With the KV cache every row decodes at
    its own position (the cache's mask is keys <= position; a row's padding slots are
    overwritten by its own new tokens before they come into view); without it (the virtual-
    token wrappers) the whole buffer is re-run and each row reads the logits at its own end."""
    import torch

    from lorafleet.models.batch import ForwardBatch
    from lorafleet.models.kv_cache import KVCache

    encoded = [tokenizer.encode(p) for p in prompts]
    B, lengths = len(encoded), torch.tensor([len(ids) for ids in encoded])
    width = int(lengths.max()) + max_tokens
    buffer = torch.zeros(B, width, dtype=torch.long)  # id 0 as padding: never attended to
    for i, ids in enumerate(encoded):
        buffer[i, :len(ids)] = torch.tensor(ids)
    rows = torch.arange(B)
    new: list[list[int]] = [[] for _ in range(B)]
    done = [False] * B
    kv = _has_kv_path(model)
    with torch.inference_mode():
        if kv:
            T = int(lengths.max())
            cache = KVCache.for_model(model, B, width)
            positions = torch.arange(T).expand(B, T)
            cache.begin(positions)
            out = model(buffer[:, :T], ForwardBatch(positions=positions, attention=cache))
            logits = out[rows, lengths - 1]
        for step in range(max_tokens):
            if not kv:   # re-run only the rows still going (the cost grows with the rows)
                live = torch.tensor([k for k in range(B) if not done[k]])
                end = int(lengths[live].max()) + step
                out = model(buffer[live, :end])
                out = out.logits if hasattr(out, "logits") else out
                logits = torch.zeros(B, out.shape[-1], dtype=out.dtype)
                logits[live] = out[torch.arange(len(live)), lengths[live] + step - 1]
            token = logits.float().argmax(-1)
            for k, t in enumerate(token.tolist()):
                if done[k]:
                    continue
                if t == tokenizer.eos_token_id:
                    done[k] = True
                    continue
                new[k].append(t)
                done[k] = "\n" in tokenizer.decode(new[k])
            if all(done) or step + 1 == max_tokens:
                break
            position = (lengths + step)[:, None]
            buffer[rows, lengths + step] = token
            if kv:
                cache.begin(position)
                logits = model(token[:, None], ForwardBatch(positions=position,
                                                            attention=cache))[:, -1]
    return [tokenizer.decode(ids) for ids in new]


def run_one(spec: dict) -> dict:
    """Train spec["overrides"] on the parent's data, score it; a JSON-able dict."""
    import torch

    from lorafleet.demo.tasks import score
    from lorafleet.models import load_tokenizer
    from lorafleet.train.trainer import TrainConfig, train

    torch.set_num_threads(int(spec.get("threads", 1)))
    work = Path(spec["work"])
    settings = {"seed": 0, "warmup": 10, "bf16": True, "max_len": 128,
                **spec.get("train", {}), **spec["overrides"]}
    tcfg = TrainConfig.from_flat(model=spec["base"], data=str(work / TRAIN_FILE),
                                 val_file=str(work / VAL_FILE), out=spec["out"],
                                 steps=spec["steps"], batch_size=spec["batch_size"],
                                 overwrite=True, device="cpu", **settings)
    t0 = time.perf_counter()
    result = train(tcfg)
    train_s = time.perf_counter() - t0
    model = result.model.eval()
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    # weights (any dtype, incl. packed NF4 buffers) + fp32 grads and two AdamW moments
    weight_bytes = sum(t.numel() * t.element_size()
                       for t in [*model.parameters(), *model.buffers()])
    tokenizer = load_tokenizer(spec["base"])
    t0 = time.perf_counter()
    val, test = read_examples(work / VAL_FILE), read_examples(work / TEST_FILE)
    # one batch for both splits: the decode steps, not the rows, cost the time here
    outputs = greedy_batch(model, tokenizer, [e.prompt for e in val + test], spec["max_tokens"])
    scores = {"val": score("e2e", outputs[:len(val)], val),
              "test": score("e2e", outputs[len(val):], test)}
    samples = {"test": outputs[len(val)].strip()}
    steps = [e for e in result.history if e["type"] == "step"]
    evals = [{"step": e["step"], "eval_loss": e["eval_loss"],
              # the mean training loss over the steps since the previous evaluation
              "train_loss": sum(s["loss"] for s in steps[max(0, e["step"] - 20):e["step"]])
              / max(1, min(20, e["step"]))}
             for e in result.history if e["type"] == "eval"]
    return {"trainable": trainable, "bleu": scores["test"], "val_bleu": scores["val"],
            "train_loss": result.loss, "val_loss": result.eval_loss, "evals": evals,
            "steps": result.steps, "train_s": train_s,
            "ms_per_step": 1000 * train_s / max(1, result.steps),
            "eval_s": time.perf_counter() - t0,
            "state_mb": (weight_bytes + trainable * 4 * 3) / 2**20,
            "sample": samples["test"], "torch_threads": torch.get_num_threads(),
            "pid": os.getpid()}
