"""The serving engine: one base model, any number of registered adapters, continuous batching.

`step()` reads like nano-vllm's: schedule -> run -> postprocess.

    engine = Engine("path/to/model", config=EngineConfig(num_pages=4096))
    engine.register_adapter("sql", "adapters/sql")
    engine.generate(["SELECT"], adapters=["sql"], params=SamplingParams(max_tokens=32))

Errors: `add_request` raises RequestError at once for a request that can never run (unknown
adapter, empty or too long prompt, more pages than the pool holds); failures found later (early
abort past the first-token deadline) come back as a finished RequestOutput with `error` set. In
both cases the engine keeps serving every other request.
"""
from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from lorafleet.errors import AdapterError, ConfigError, EngineError, RequestError
from lorafleet.models import load_model
from lorafleet.models.sampling import SamplingParams, sample, token_and_top_logprobs

from .adapter_cache import AdapterCache, build_host_adapter, read_peft_folder
from .kv_cache import KVCacheManager
from .pool import PagePool
from .runner import ModelRunner
from .scheduler import Scheduler, SchedulerConfig
from .sequence import Sequence, SeqStatus

log = logging.getLogger(__name__)

@dataclass
class EngineConfig:
    num_pages: int = 8192              # pool size in pages of hidden_size numbers each
    block_tokens: int = 16             # KV tokens added per allocation (kv_cache.py)
    max_num_seqs: int = 64             # running batch size cap
    max_num_batched_tokens: int = 2048 # tokens per step: decode rows + prefill chunks
    max_lora_rank: int = 64
    max_adapters_per_step: int | None = None
    first_token_deadline_s: float | None = None
    max_model_len: int | None = None   # default: the model's max_position_embeddings
    dtype: str | torch.dtype = torch.float32
    device: str = "cpu"
    # Steps mix decode rows with prefill chunks, long prompts over several steps (scheduler.py);
    # False: a step is all prefill or all decode.
    enable_chunked_prefill: bool = True
    # bf16 on CPU: base projections also held in oneDNN's packed layout (packed_linear.py):
    # faster decode matmuls, twice the projection weights' memory.
    prepack_weights: bool = True


@dataclass
class StepRecord:
    is_prefill: bool         # the step has prefill tokens (False: decode rows only)
    num_seqs: int
    num_tokens: int          # tokens run through the model
    context_tokens: int      # KV tokens attended to (sum of sequence lengths)
    adapters: list[str]      # distinct adapters in the batch
    seconds: float           # forward + sampling + postprocessing
    num_prefill_tokens: int = 0
    num_decode_seqs: int = 0


# Per token, with params.logprobs: its logprob; with params.top_logprobs = N as well, a dict
# {token id: logprob} of the N most likely tokens and the chosen one (N or N + 1 entries).
TokenLogprob = float | dict[int, float]


@dataclass
class RequestOutput:
    request_id: str
    new_token_ids: list[int]
    new_text: str
    finished: bool
    finish_reason: str | None          # "stop", "length", "abort", "deadline", "error"
    logprobs: list[TokenLogprob] | None
    prompt_tokens: int
    completion_tokens: int
    error: str | None = None


@dataclass
class Completion:
    request_id: str
    token_ids: list[int]
    text: str
    finish_reason: str | None
    logprobs: list[TokenLogprob] | None
    prompt_tokens: int
    completion_tokens: int
    error: str | None = None


class Engine:
    def __init__(self, model, tokenizer=None, config: EngineConfig | None = None):
        """model: a checkpoint folder or a loaded lorafleet model (its projections are swapped
        for BatchedLoraLinear shells, which behave as before when called without LoRA)."""
        self.config = config = config or EngineConfig()
        if isinstance(model, (str, Path)):
            if tokenizer is None and (Path(model) / "tokenizer.json").is_file():
                from lorafleet.models.tokenizer import load_tokenizer
                tokenizer = load_tokenizer(model)
            model = load_model(model, dtype=config.dtype, device=config.device)
        self.model, self.tokenizer = model, tokenizer
        self.max_model_len = config.max_model_len or model.config.max_position_embeddings
        self.pool = PagePool(config.num_pages)
        self.runner = ModelRunner(model, config.num_pages, config.block_tokens,
                                  config.prepack_weights)
        self.kv = KVCacheManager(self.pool, self.runner.layout)
        self.cache = AdapterCache(self.pool, self.runner.write_pages)
        self.runner.attach(self.cache)
        self.scheduler = Scheduler(
            SchedulerConfig(config.max_num_seqs, config.max_num_batched_tokens,
                            config.max_adapters_per_step, config.first_token_deadline_s,
                            config.enable_chunked_prefill),
            self.kv, self.cache)
        eos = getattr(tokenizer, "eos_token_ids", None) or model.config.eos_token_id
        self.eos_ids = set([eos] if isinstance(eos, int) else eos or [])
        self.requests: dict[str, Sequence] = {}
        # Public methods take this lock: AsyncEngine steps in a thread while the HTTP server
        # registers adapters and adds requests from others.
        self.lock = threading.RLock()
        self._pending: list[RequestOutput] = []
        self.num_steps = self.num_generated = 0
        # Set to a list to record one StepRecord per forward pass (benchmarks).
        self.step_log: list[StepRecord] | None = None

    # ---- adapters ----------------------------------------------------------------------------

    def register_adapter(self, name: str, path) -> None:
        """Register a PEFT folder under `name` (validated against the base model now)."""
        config, tensors = read_peft_folder(path)
        self.register_adapter_tensors(name, config, tensors)

    def register_store(self, store) -> list[str]:
        """Register every adapter of an `AdapterStore` (or a folder of PEFT folders)."""
        from lorafleet.adapters.store import AdapterStore

        store = store if isinstance(store, AdapterStore) else AdapterStore(store)
        names = store.names()
        for name in names:
            self.register_adapter(name, store.path(name))
        return names

    def register_adapter_tensors(self, name: str, config: dict, tensors: dict) -> None:
        """Same from an adapter_config dict and PEFT-keyed tensors already in memory."""
        with self.lock:
            if not name:
                raise AdapterError("an adapter needs a non-empty name")
            self.cache.register(build_host_adapter(
                name, config, tensors, self.runner.targets, self.runner.pages.shape[1],
                self.config.max_lora_rank, self.runner.dtype, exclude=frozenset({"lm_head"})))

    def unregister_adapter(self, name: str) -> None:
        with self.lock:
            if name not in self.cache:
                raise EngineError(f"adapter {name!r} is not registered")
            if any(s.adapter == name for s in self.requests.values()):
                raise EngineError(f"adapter {name!r} is used by queued or running requests")
            self.cache.unregister(name)

    def adapters(self) -> list[str]:
        return self.cache.names()

    # ---- requests ----------------------------------------------------------------------------

    def add_request(self, request_id: str, prompt_ids, adapter: str | None = None,
                    params: SamplingParams | None = None) -> None:
        with self.lock:
            params = params or SamplingParams()
            if request_id in self.requests:
                raise RequestError(f"request id {request_id!r} is already in use")
            if isinstance(prompt_ids, str):
                if self.tokenizer is None:
                    raise RequestError("a text prompt needs a tokenizer; pass token ids")
                prompt_ids = self.tokenizer.encode(prompt_ids)
            prompt_ids = [int(t) for t in prompt_ids]
            if not prompt_ids:
                raise RequestError("the prompt is empty: it needs at least one token")
            vocab = self.model.config.vocab_size
            if min(prompt_ids) < 0 or max(prompt_ids) >= vocab:
                raise RequestError(f"prompt token ids must be in [0, {vocab})")
            if adapter is not None and adapter not in self.cache:
                raise RequestError(f"unknown adapter {adapter!r}; registered: "
                                   f"{', '.join(self.adapters()[:8]) or 'none'}")
            if len(prompt_ids) >= self.max_model_len:
                raise RequestError(f"prompt has {len(prompt_ids)} tokens; the model's context is "
                                   f"{self.max_model_len} (prompt + at least one new token)")
            if params.stop and self.tokenizer is None:
                raise RequestError("stop strings need a tokenizer")
            max_tokens = min(params.max_tokens, self.max_model_len - len(prompt_ids))
            pages = self.kv.layout.pages_for_tokens(len(prompt_ids) + max_tokens)
            if adapter is not None:
                pages += self.cache.host[adapter].num_pages
            if pages > self.pool.num_pages:
                raise RequestError(f"request needs {pages} pages (prompt {len(prompt_ids)} + "
                                   f"max_tokens {max_tokens} tokens of KV, plus its adapter); the "
                                   f"pool has {self.pool.num_pages}")
            seq = Sequence(request_id, prompt_ids, adapter, params, time.monotonic(), max_tokens)
            if params.seed is not None:
                seq.generator = torch.Generator(device=self.runner.device).manual_seed(params.seed)
            self.requests[request_id] = seq
            self.scheduler.add(seq)

    def abort(self, request_id: str) -> bool:
        """Drop a request now (its pages are freed at once); its final output, with
        finish_reason "abort", comes from the next step()."""
        with self.lock:
            seq = self.scheduler.abort(request_id)
            if seq is None:
                return False
            self._pending.append(self._final(seq))
            return True

    def has_work(self) -> bool:
        return self.scheduler.has_work() or bool(self._pending)

    # ---- the loop ----------------------------------------------------------------------------

    def step(self) -> list[RequestOutput]:
        with self.lock:
            outputs, self._pending = self._pending, []
            batch = self.scheduler.schedule()
            for seq in batch.aborted:
                seq.error = "first-token deadline exceeded while queued"
                outputs.append(self._final(seq))
            if batch.seqs:
                started = time.perf_counter()
                seqs, logits = self.runner.run(batch.seqs, batch.num_new_tokens, self.kv)
                for seq, n in zip(batch.seqs, batch.num_new_tokens):
                    seq.num_computed_tokens += n
                if seqs:      # a row with NaN/Inf logits fails its own request, no other
                    seqs, logits = self._drop_nonfinite(seqs, logits, outputs)
                if seqs:      # else only middle chunks of long prompts ran: nothing to sample
                    tokens = self._sample(seqs, logits)
                    logprobs = self._logprobs(seqs, logits, tokens)
                    for i, (seq, token) in enumerate(zip(seqs, tokens.tolist())):
                        outputs.append(self._postprocess(seq, token, logprobs and logprobs[i]))
                self.num_steps += 1
                if self.step_log is not None:
                    self.step_log.append(self._record(batch, time.perf_counter() - started))
            return outputs

    @staticmethod
    def _record(batch, seconds: float) -> StepRecord:
        """After the step: each sequence's num_computed_tokens is its context length."""
        return StepRecord(
            batch.is_prefill, len(batch.seqs), sum(batch.num_new_tokens),
            sum(s.num_computed_tokens for s in batch.seqs),
            sorted({s.adapter for s in batch.seqs if s.adapter}), seconds,
            batch.num_prefill_tokens, batch.num_decode)

    def _drop_nonfinite(self, seqs: list[Sequence], logits: torch.Tensor,
                        outputs: list[RequestOutput]) -> tuple[list[Sequence], torch.Tensor]:
        """Finish each row whose logits [B, V] hold NaN or Inf (a broken adapter, an overflow)
        with an error, and return the other rows: sampling one bad row would raise and fail
        every request in the batch."""
        finite = torch.isfinite(logits).all(dim=-1)
        if bool(finite.all()):
            return seqs, logits
        keep = []
        for i, (seq, ok) in enumerate(zip(seqs, finite.tolist())):
            if ok:
                keep.append(i)
                continue
            seq.error = (f"the model produced non-finite logits (NaN or Inf) for this request"
                         f"{f' with adapter {seq.adapter!r}' if seq.adapter else ''}; the "
                         f"adapter's weights or the prompt overflow the model's dtype")
            log.warning("request %s: %s", seq.request_id, seq.error)
            self.scheduler.finish(seq, "error")
            outputs.append(self._output(seq))
        index = torch.tensor(keep, dtype=torch.long, device=logits.device)
        return [seqs[i] for i in keep], logits.index_select(0, index)

    def fail_running(self, message: str) -> list[RequestOutput]:
        """Finish every running request with `message` as its error (the step loop calls this
        when a step raised: those requests' state is unknown). Waiting requests stay queued."""
        with self.lock:
            outputs = []
            for seq in list(self.scheduler.running):
                seq.error = message
                self.scheduler.finish(seq, "error")
                outputs.append(self._output(seq))
            return outputs

    def _sample(self, seqs: list[Sequence], logits: torch.Tensor) -> torch.Tensor:
        if all(s.params.temperature == 0 for s in seqs):
            return logits.argmax(dim=-1)
        return sample(logits, [s.params.temperature for s in seqs],
                      [s.params.top_k for s in seqs], [s.params.top_p for s in seqs],
                      [s.generator for s in seqs])

    @staticmethod
    def _logprobs(seqs: list[Sequence], logits: torch.Tensor,
                  tokens: torch.Tensor) -> list[TokenLogprob | None] | None:
        """Per row (logits [B, V], tokens [B]): None when its request did not ask, else its
        TokenLogprob. None when no row asks: the default path computes nothing."""
        rows = [i for i, s in enumerate(seqs) if s.params.logprobs]
        if not rows:
            return None
        k = max(seqs[i].params.top_logprobs for i in rows)
        if len(rows) < len(seqs):
            index = torch.tensor(rows, device=logits.device)
            logits, tokens = logits.index_select(0, index), tokens.index_select(0, index)
        chosen, top_values, top_ids = token_and_top_logprobs(logits, tokens, k)
        chosen, top_values, top_ids = chosen.tolist(), top_values.tolist(), top_ids.tolist()
        result: list[TokenLogprob | None] = [None] * len(seqs)
        for j, (i, token) in enumerate(zip(rows, tokens.tolist())):
            n = seqs[i].params.top_logprobs
            if n:
                result[i] = {**dict(zip(top_ids[j][:n], top_values[j][:n])), token: chosen[j]}
            else:
                result[i] = chosen[j]
        return result

    def _postprocess(self, seq: Sequence, token: int,
                     logprob: TokenLogprob | None) -> RequestOutput:
        self.num_generated += 1
        if seq.first_token_time is None:
            seq.first_token_time = time.monotonic()
        reason = None
        eos_ids = self.eos_ids if seq.params.eos_token_ids is None else seq.params.eos_token_ids
        if token in eos_ids and not seq.params.ignore_eos:
            reason = "stop"           # EOS ends the completion and is not part of it
        else:
            seq.output_ids.append(token)
            if logprob is not None:
                seq.logprobs.append(logprob)
            if seq.params.stop:
                reason = self._check_stop(seq)
            if reason is None and len(seq.output_ids) >= seq.max_tokens:
                reason = "length"
        if reason is not None:
            self.scheduler.finish(seq, reason)
        return self._output(seq)

    def _check_stop(self, seq: Sequence) -> str | None:
        seq.text = self.tokenizer.decode(seq.output_ids)
        cuts = [i for i in (seq.text.find(s) for s in seq.params.stop) if i >= 0]
        if cuts:
            seq.text = seq.text[:min(cuts)]
            return "stop"
        return None

    def _output(self, seq: Sequence) -> RequestOutput:
        """The tokens and text not yet handed out. Text that may still change (an incomplete
        UTF-8 character, or a possible beginning of a stop string) is held back."""
        finished = seq.is_finished
        new_ids = seq.output_ids[seq.sent_token_count:]
        new_logprobs = seq.logprobs[seq.sent_token_count:] if seq.params.logprobs else None
        seq.sent_token_count = len(seq.output_ids)
        new_text = ""
        if self.tokenizer is not None:
            if not seq.params.stop or (finished and seq.finish_reason != "stop"):
                seq.text = self.tokenizer.decode(seq.output_ids)
            visible = len(seq.text)
            if not finished:
                if seq.text.endswith("\ufffd"):
                    visible -= 1
                hold = max((len(s) - 1 for s in seq.params.stop), default=0)
                visible = max(seq.sent_text_len, visible - hold)
            new_text = seq.text[seq.sent_text_len:visible]
            seq.sent_text_len = visible
        if finished:
            self.requests.pop(seq.request_id, None)
        return RequestOutput(seq.request_id, new_ids, new_text, finished, seq.finish_reason,
                             new_logprobs, len(seq.prompt_ids), len(seq.output_ids), seq.error)

    def _final(self, seq: Sequence) -> RequestOutput:
        seq.status = SeqStatus.FINISHED
        return self._output(seq)

    # ---- offline use and monitoring ----------------------------------------------------------

    def generate(self, prompts: list, adapters: list[str | None] | None = None,
                 params: SamplingParams | list[SamplingParams] | None = None) -> list[Completion]:
        """Run prompts (text or token ids) to completion; results in prompt order."""
        adapters = adapters if adapters is not None else [None] * len(prompts)
        if not isinstance(params, list):
            params = [params or SamplingParams()] * len(prompts)
        if not len(adapters) == len(params) == len(prompts):
            raise ConfigError("prompts, adapters and params must have the same length")
        ids = [f"generate-{self.num_steps}-{i}" for i in range(len(prompts))]
        for request_id, prompt, adapter, p in zip(ids, prompts, adapters, params):
            self.add_request(request_id, prompt, adapter, p)
        results: dict[str, Completion] = {}
        finished = 0
        while finished < len(ids):
            for out in self.step():
                finished += out.finished
                done = results.setdefault(out.request_id, Completion(
                    out.request_id, [], "", None, [] if out.logprobs is not None else None,
                    out.prompt_tokens, 0))
                done.token_ids += out.new_token_ids
                done.text += out.new_text
                if out.logprobs is not None:
                    done.logprobs += out.logprobs
                done.finish_reason, done.error = out.finish_reason, out.error
                done.completion_tokens = out.completion_tokens
        return [results[i] for i in ids]

    def stats(self) -> dict:
        with self.lock:
            return {**self.pool.stats(), **self.cache.stats(),
                    "queue_depth": len(self.scheduler.waiting),
                    "running": len(self.scheduler.running),
                    "preemptions": self.scheduler.num_preemptions,
                    "steps": self.num_steps, "generated_tokens": self.num_generated}
