"""The training loop: one plain loop for every method (read it top to bottom, like nanoGPT's
train.py). The model only has to map input_ids [B, T] to logits [B, T, vocab] (or an object
with `.logits`), so our models and transformers models train the same way.

One optimizer step ("step") consumes a global batch of batch_size * grad_accum * world_size
examples. The loss is the mean over every label token of that global batch, whatever way it is
split into micro-batches and processes, so 2 processes x batch 2 equals 1 process x batch 4.
"""
from __future__ import annotations

import functools
import json
import logging
import math
import random
import signal
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from lorafleet.errors import ConfigError, TrainingError
from lorafleet.models.tokenizer import read_chat_template
from lorafleet.train import distributed as dist
from lorafleet.train.base import load_base, trainable_in_float32
from lorafleet.train.checkpoint import (CHECKPOINT_DIR, SHARDED, Checkpoint, capture_rng,
                                        latest_checkpoint, load_checkpoint, load_sharded_state,
                                        restore_rng, save_checkpoint, save_sharded_state)
from lorafleet.train.config import TrainConfig
from lorafleet.train.data import IGNORE_INDEX, Sampler, collate, load_dataset
from lorafleet.train.packing import check_packable, packed_batch
from lorafleet.train.report import RunLog
from lorafleet.train.methods import apply_method, save_trained, trainable_state
from lorafleet.train.optim import check_optimizer, make_optimizer

logger = logging.getLogger(__name__)

RUN_FILES = ("train_config.json", "log.jsonl", CHECKPOINT_DIR, "adapter", "tensorboard")
MAX_LOG_PERPLEXITY = 50.0
@dataclass
class TrainResult:
    out: Path
    artifact: Path | None           # the saved adapter / method artifact (None if interrupted)
    steps: int
    loss: float                     # training loss of the last step
    eval_loss: float | None
    interrupted: bool = False
    history: list[dict] = field(default_factory=list)
    model: nn.Module | None = None  # the trained module (input_ids -> logits), for evaluation


# ---- plain functions --------------------------------------------------------------------------

def learning_rate(step: int, cfg: TrainConfig, total_steps: int) -> float:
    """Linear warmup, then cosine / linear decay to lr * min_lr_ratio (nanoGPT's get_lr)."""
    warmup = cfg.warmup_steps(total_steps)
    if step < warmup:
        return cfg.lr * (step + 1) / warmup
    if cfg.schedule == "constant" or total_steps <= warmup:
        return cfg.lr
    progress = min(1.0, (step - warmup) / max(1, total_steps - warmup))
    decay = 0.5 * (1 + math.cos(math.pi * progress)) if cfg.schedule == "cosine" else 1 - progress
    return cfg.lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * decay)


def logits_of(model: nn.Module, input_ids: torch.Tensor) -> torch.Tensor:
    out = model(input_ids)
    return out.logits if hasattr(out, "logits") else out


def forward_logits(model: nn.Module, examples, pad_id: int, device) -> tuple[torch.Tensor,
                                                                          torch.Tensor]:
    """(logits [B, T, V], labels [B, T]) of a micro-batch; packed rows get their block-diagonal
    mask and per-example positions (packing.py)."""
    input_ids, labels = (t.to(device) for t in collate(examples, pad_id))
    if examples[0].lengths is None:
        return logits_of(model, input_ids), labels
    batch = packed_batch([e.lengths for e in examples], input_ids.shape[1], device)
    out = model(input_ids, batch)
    return (out.logits if hasattr(out, "logits") else out), labels


def loss_sum(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Summed next-token cross-entropy. logits: [B, T, V], labels: [B, T] (-100 = no loss)."""
    return F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(),
                           ignore_index=IGNORE_INDEX, reduction="sum")


def perplexity(loss: float) -> float:
    # exp(loss), capped: a diverged run's loss of 1000 would overflow a float.
    return math.exp(min(loss, MAX_LOG_PERPLEXITY))


def count_targets(examples) -> int:
    return sum(sum(1 for t in e.labels[1:] if t != IGNORE_INDEX) for e in examples)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def enable_gradient_checkpointing(model: nn.Module) -> int:
    """Recompute each decoder layer's activations in backward instead of keeping them.
    Returns how many layers were wrapped (the ModuleList named *.layers or *.h)."""
    from torch.utils.checkpoint import checkpoint
    layers = dist.decoder_layers(model)
    for layer in layers:
        layer.forward = functools.partial(checkpoint, layer.forward, use_reentrant=False)
    if not layers:
        raise ConfigError("grad_checkpointing: no decoder layer list (*.layers / *.h) found")
    return len(layers)


@torch.no_grad()
def evaluate(model: nn.Module, examples, batch_size: int, pad_id: int, device,
             bf16: bool = False) -> float:
    """Mean next-token loss over every label token of `examples` (validation during training,
    and `lorafleet eval`)."""
    was_training = model.training
    model.eval()
    total, tokens = 0.0, 0
    for i in range(0, len(examples), batch_size):
        chunk = examples[i:i + batch_size]
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            total += loss_sum(*forward_logits(model, chunk, pad_id, device)).item()
        tokens += count_targets(chunk)
    model.train(was_training)
    return total / max(1, tokens)


# ---- the output folder and logs ---------------------------------------------------------------

def prepare_out_dir(cfg: TrainConfig) -> Path:
    out = Path(cfg.out)
    existing = [n for n in RUN_FILES if (out / n).exists()]
    if existing and not (cfg.resume or cfg.overwrite):
        raise TrainingError(f"{out} already holds a training run ({', '.join(existing)}); pass "
                            "--resume to continue it or --overwrite to replace it")
    if cfg.resume and latest_checkpoint(out) is None:
        raise TrainingError(f"--resume: {out / CHECKPOINT_DIR} holds no checkpoint to resume")
    if cfg.overwrite and dist.is_main():
        import shutil
        for name in existing:
            path = out / name
            shutil.rmtree(path) if path.is_dir() else path.unlink()
    dist.barrier()
    out.mkdir(parents=True, exist_ok=True)
    return out


class StopFlag:
    """Set by SIGINT/SIGTERM (or a callback returning True); checked after each step."""

    def __init__(self):
        self.requested = False
        self._previous = {}

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame):
        logger.warning("received %s: saving a checkpoint after this step",
                       signal.Signals(signum).name)
        self.requested = True

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


# ---- the loop ---------------------------------------------------------------------------------

def resume(out: Path, cfg: TrainConfig, mode: str, trained: nn.Module, optimizer, sampler
           ) -> tuple[int, float]:
    """Load the latest checkpoint of `out` into this run (every process its own part); returns
    (step, loss). A checkpoint of another method/targets, process count or --parallel mode is
    refused with the setting to change."""
    path = latest_checkpoint(out)
    ckpt = load_checkpoint(path, dist.rank(), dist.world_size())
    names = sorted(trainable_state(trained))
    saved_names = sorted(ckpt.trainable) if ckpt.trainable is not None else ckpt.trainable_names
    if ckpt.extra.get("method") not in (None, asdict(cfg.method)) \
            or (saved_names and saved_names != names):
        raise TrainingError(f"--resume: the checkpoint in {out} does not fit this run's "
                            f"method/targets ({cfg.method.method}, {cfg.method.targets}); use "
                            f"the settings of {out / 'train_config.json'}")
    if mode == "fsdp":
        load_sharded_state(trained, optimizer, path / SHARDED)
    elif ckpt.trainable is None:
        raise TrainingError(f"--resume: {path} holds sharded state; resume with --parallel "
                            "fsdp under the same torchrun command")
    else:
        trained.load_state_dict(ckpt.trainable, strict=False)
        optimizer.load_state_dict(ckpt.optimizer)
    sampler.load_state_dict(ckpt.data_position)
    restore_rng(ckpt.rng)
    logger.info("resumed from %s (step %d)", path, ckpt.step)
    return ckpt.step, ckpt.extra.get("loss", float("nan"))



def train(cfg: TrainConfig, model: nn.Module | None = None, tokenizer=None,
          callback: Callable[[dict], bool | None] | None = None,
          progress: Callable[[int, int], None] | None = None) -> TrainResult:
    """Train `cfg.method` on `cfg.data` and save the artifact to `cfg.out/adapter`.

    `model`/`tokenizer` default to the base in cfg.model (see `load_base`) and its tokenizer;
    pass a transformers model and tokenizer to train one of those. `callback(event)` receives a
    dict per step ({"type": "step", "step", "total_steps", "loss", "lr", "tokens_per_s", ...})
    and per evaluation; returning True asks the run to stop (checkpoint saved, resumable).
    `progress(done, total)`: called per checkpoint tensor while the base loads.
    Under torchrun every process calls this; rank 0 writes logs and the artifact.
    """
    mode = dist.resolve_mode(cfg.parallel)
    dist.setup()
    device = torch.device(cfg.device) if cfg.device else dist.default_device()
    check_optimizer(cfg.optim, device, mode)
    out = prepare_out_dir(cfg)
    seed_everything(cfg.seed)
    if tokenizer is None:
        from lorafleet.models import load_tokenizer
        tokenizer = load_tokenizer(cfg.model)
    if cfg.chat_template:
        tokenizer.chat_template = read_chat_template(cfg.chat_template)
    train_set, val_set, stats = load_dataset(cfg.data_config(), tokenizer)
    if model is None:
        model = load_base(cfg, device, progress)
    method_state: dict = {}
    trained = apply_method(model, cfg.method, method_state).to(device)
    trainable_in_float32(trained)
    if cfg.pack:
        check_packable(trained)
    if cfg.grad_checkpointing:
        enable_gradient_checkpointing(trained)
    engine = dist.wrap(trained, mode, device)  # what the loop calls; `trained` owns the params
    params = [p for p in trained.parameters() if p.requires_grad]  # FSDP: the shards
    optimizer = make_optimizer(cfg.optim, params, cfg.lr, cfg.weight_decay, device, mode)
    pad_id = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else 0

    world, rank = dist.world_size(), dist.rank()
    per_rank = cfg.batch_size * cfg.grad_accum
    global_batch = per_rank * world
    total_steps = cfg.steps if cfg.steps is not None else \
        math.ceil((cfg.epochs or 1.0) * len(train_set) / global_batch)
    sampler = Sampler(len(train_set), cfg.seed)
    trained_names = sorted(trainable_state(trained))
    run_identity = {"method": asdict(cfg.method), "parallel": mode}

    step, loss_value, eval_loss, history = 0, float("nan"), None, []
    if cfg.resume:
        step, loss_value = resume(out, cfg, mode, trained, optimizer, sampler)
    elif dist.is_main():
        (out / "train_config.json").write_text(json.dumps(cfg.to_json(), indent=2))
    log = RunLog(out, enabled=dist.is_main(), report_to=cfg.report_to, config=cfg.to_json())
    logger.info("%s: %d trainable / %d parameters; %d train / %d val examples; %d steps; "
                "%d process(es), parallel=%s", cfg.method.method, sum(p.numel() for p in params),
                sum(p.numel() for p in trained.parameters()), len(train_set), len(val_set),
                total_steps, world, mode)

    def checkpoint(extra: dict) -> Path:
        sharded = mode == "fsdp"
        ckpt = Checkpoint(step, None if sharded else trainable_state(trained),
                          None if sharded else optimizer.state_dict(), sampler.state_dict(),
                          capture_rng(), {**extra, **run_identity}, trained_names, world)
        # lora/qlora: a PEFT folder inside each checkpoint, which serve and eval load as is
        servable = cfg.method.method in ("lora", "qlora") and not sharded
        return save_checkpoint(out, ckpt, write_sharded=(
            lambda folder: save_sharded_state(trained, optimizer, folder)) if sharded else None,
            write_adapter=(lambda folder: save_trained(trained, cfg.method, method_state, folder)
                           ) if servable else None, keep=cfg.keep_checkpoints)

    trained.train()
    interrupted = False
    with StopFlag() as stop:
        while step < total_steps:
            t0 = time.perf_counter()
            lr = learning_rate(step, cfg, total_steps)
            for group in optimizer.param_groups:
                group["lr"] = lr
            batch = [train_set[i] for i in sampler.take(global_batch)]
            n_targets = max(1, count_targets(batch))
            mine = batch[rank * per_rank:(rank + 1) * per_rank]
            step_loss, n_tokens = torch.zeros((), device=device), 0
            for i in range(0, per_rank, cfg.batch_size):
                chunk = mine[i:i + cfg.batch_size]
                with dist.no_sync(engine, last_micro_batch=i + cfg.batch_size >= per_rank):
                    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=cfg.bf16):
                        micro_loss = loss_sum(*forward_logits(engine, chunk, pad_id, device)
                                              ) / n_targets
                    # x world: DDP and FSDP average the ranks' gradients; we want their sum.
                    (micro_loss * world).backward()
                step_loss += micro_loss.detach()
                n_tokens += sum(len(e.input_ids) for e in chunk)
            step_loss = float(dist.sum_scalar(step_loss))
            grad_norm = dist.full_norm(nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)) \
                if cfg.max_grad_norm > 0 else 0.0
            if not (math.isfinite(step_loss) and math.isfinite(grad_norm)):
                last = latest_checkpoint(out)
                log.close()
                raise TrainingError(
                    f"loss became {step_loss} at step {step + 1}; training stopped without "
                    f"applying that update. Last good checkpoint: "
                    f"{last if last else 'none (set --save-every to keep some)'}; try a lower "
                    f"--lr or --max-grad-norm")
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            loss_value = step_loss
            elapsed = time.perf_counter() - t0
            event = {"type": "step", "step": step, "total_steps": total_steps, "loss": loss_value,
                     "lr": lr, "grad_norm": grad_norm, "tokens": n_tokens * world,
                     "tokens_per_s": n_tokens * world / elapsed, "step_time_s": elapsed}
            log.write(event)
            history.append(event)
            if val_set and cfg.eval_every and step % cfg.eval_every == 0:
                eval_loss = evaluate(trained, val_set, cfg.batch_size, pad_id, device, cfg.bf16)
                eval_event = {"type": "eval", "step": step, "eval_loss": eval_loss,
                              "perplexity": perplexity(eval_loss)}
                log.write(eval_event)
                history.append(eval_event)
                if callback:
                    callback(eval_event)
            if callback and callback(event):
                stop.requested = True
            if cfg.save_every and step % cfg.save_every == 0:
                checkpoint({"loss": loss_value})
            if dist.any_rank(stop.requested) and step < total_steps:
                path = checkpoint({"loss": loss_value})
                logger.warning("stopped at step %d; checkpoint %s; continue with --resume",
                               step, path)
                interrupted = True
                break

    artifact = None
    if not interrupted:
        if val_set and (not cfg.eval_every or step % cfg.eval_every):
            eval_loss = evaluate(trained, val_set, cfg.batch_size, pad_id, device, cfg.bf16)
            log.write({"type": "eval", "step": step, "eval_loss": eval_loss,
                       "perplexity": perplexity(eval_loss)})
        artifact = out / "adapter"
        with dist.gathered_trainable(trained, mode):  # FSDP: whole on rank 0, which writes
            if dist.is_main():
                save_trained(trained, cfg.method, method_state, artifact)
        dist.barrier()
    log.close()
    return TrainResult(out, artifact, step, loss_value, eval_loss, interrupted, history, trained)
