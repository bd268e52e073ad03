"""The serving engine: one base model, any number of registered adapters, continuous batching.

`step()` reads like nano-vllm's: schedule -> run -> postprocess.

    engine = Engine("path/to/model", config=EngineConfig(memory_budget="8GiB"))
    engine.register_adapter("sql", "adapters/sql")
    engine.generate(["SELECT"], adapters=["sql"], params=SamplingParams(max_tokens=32))

Errors: `add_request` raises RequestError at once for a request that can never run (unknown
adapter, empty or too long prompt, more pages than the pool holds); failures found later (early
abort past the first-token deadline) come back as a finished RequestOutput with `error` set. In
both cases the engine keeps serving every other request.

Size (~420 lines): the public interface (adapters, requests, the loop, offline use, stats),
each method short; what they do lives beside it (engine_config.py, adapter_stores.py,
scheduler.py, runner.py, logits.py, output.py), and splitting the class further would only
move its thin delegations.
"""
from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from lorafleet.adapters.store import check_name, is_valid_name
from lorafleet.errors import ConfigError, EngineError, RequestError
from lorafleet.models import load_model
from lorafleet.models.dtype import resolve_dtype
from lorafleet.models.modules import OUTPUT_HEAD
from lorafleet.models.sampling import SamplingParams

from .adapter_cache import LOAD_AHEAD, AdapterCache, build_host_adapter
from .adapter_loader import AdapterLoader, HostCache
from .adapter_registry import BaseLayout, read_spec
from .adapter_stores import AdapterStores
from .engine_config import EngineConfig
from .json_grammar import JsonVocab
from .kv_cache import KVCacheManager
from .logits import sample_rows, sampled_logprobs, score_prompts
from .memory import available_memory, kv_tokens, plan_for_model, weight_bytes
from .output import Completion, OutputProcessor, RequestOutput, TokenLogprob
from .page_copy import make_page_copier
from .pool import PagePool
from .runner import ModelRunner
from .scheduler import Scheduler, SchedulerConfig
from .sequence import Sequence, SeqStatus

log = logging.getLogger(__name__)

# When a step has nothing to run but adapter reads in flight, it waits this long for one
# (releasing the lock) instead of returning at once: callers that loop on step() do not spin.
ADAPTER_LOAD_WAIT_S = 0.05


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


class Engine:
    def __init__(self, model, tokenizer=None, config: EngineConfig | None = None):
        """model: a checkpoint folder or a loaded lorafleet model (its projections are swapped
        for BatchedLoraLinear shells, which behave as before when called without LoRA)."""
        self.config = config = config or EngineConfig()
        source, self.parallel = model, None
        if config.tensor_parallel_size > 1:     # sizes, GPUs or cores: before loading
            from .parallel import check_start
            check_start(model, config.tensor_parallel_size, config.device)
        if isinstance(model, (str, Path)):
            available = available_memory(config.device)       # before the weights take theirs
            if tokenizer is None and (Path(model) / "tokenizer.json").is_file():
                from lorafleet.models.tokenizer import load_tokenizer
                tokenizer = load_tokenizer(model)
            dtype = resolve_dtype(config.dtype, model, config.device, prefer_half=True)
            if config.quantize and config.tensor_parallel_size == 1:
                from lorafleet.quant import load_quantized_model
                model = load_quantized_model(model, dtype=dtype, device=config.device)
            else:   # with tensor parallelism each rank quantizes its shard (shard.py)
                model = load_model(model, dtype=dtype, device=config.device)
        elif config.quantize:
            raise ConfigError("EngineConfig.quantize applies to a checkpoint folder; pass a "
                              "loaded model already quantized instead")
        else:       # already loaded: its weights count in the budget as if not yet loaded
            available = available_memory(str(next(model.parameters()).device))
            available = None if available is None else available + weight_bytes(model)
        if config.tensor_parallel_size > 1:     # workers start; this model becomes rank 0's shard
            from .parallel import TensorParallel
            self.parallel = TensorParallel(source, model, config.tensor_parallel_size,
                                           next(model.parameters()).dtype, config.device,
                                           config.tensor_parallel_timeout_s, config.quantize,
                                           config.tensor_parallel_vocab)
            if available is not None and config.device == "cpu":   # N ranks share the RAM
                available //= config.tensor_parallel_size          # (on CUDA: a GPU each)
        # Public methods take this lock: AsyncEngine steps in a thread while the HTTP server
        # registers adapters and adds requests from others.
        self.lock = threading.RLock()
        self.model, self.tokenizer = model, tokenizer
        self.max_model_len = config.max_model_len or model.config.max_position_embeddings
        self.memory = plan_for_model(model, config, self.max_model_len, available)
        self.pool = PagePool(self.memory.num_pages)
        self.runner = ModelRunner(model, self.memory.num_pages, config.block_tokens,
                                  config.prepack_weights,
                                  keep_plain_weights=not self.memory.release_plain_weights)
        self.kv_token_capacity = kv_tokens(self.memory.num_pages, self.runner.layout)
        log.info("engine: %s, %s", self.runner.dtype, self.memory.summary(self.kv_token_capacity))
        self.kv = KVCacheManager(self.pool, self.runner.layout)
        targets = self.parallel.full_targets if self.parallel else self.runner.targets
        self.adapter_layout = BaseLayout(targets, self.runner.pages.shape[1],
                                         config.max_lora_rank, frozenset({OUTPUT_HEAD}),
                                         base_name=getattr(model, "name_or_path", None))
        copier = make_page_copier(self.runner.device)   # CUDA: a side stream (page_copy.py)
        self.cache = AdapterCache(
            self.pool, self.runner.write_pages,
            AdapterLoader(self.runner.dtype, config.async_adapter_loading, copier.stage),
            HostCache(config.max_cpu_loras, config.max_cpu_lora_bytes, LOAD_AHEAD), copier)
        self.adapter_stores = AdapterStores(self.adapter_layout, self.cache, self.lock)
        self.stores = self.adapter_stores.stores   # attached AdapterStores (register_store)
        self.runner.attach(self.cache)
        if self.parallel:
            self.parallel.attach(self)
        self.scheduler = Scheduler(
            SchedulerConfig(config.max_num_seqs, config.max_num_batched_tokens,
                            config.max_adapters_per_step, config.first_token_deadline_s,
                            config.enable_chunked_prefill),
            self.kv, self.cache)
        eos = getattr(tokenizer, "eos_token_ids", None) or model.config.eos_token_id
        self.eos_ids = set([eos] if isinstance(eos, int) else eos or [])
        self.output = OutputProcessor(tokenizer)
        self._json_vocab_cache: JsonVocab | None = None    # response_format json_object
        self.requests: dict[str, Sequence] = {}
        self._pending: list[RequestOutput] = []
        self.num_steps = self.num_generated = 0
        # Set to a list to record one StepRecord per forward pass (benchmarks).
        self.step_log: list[StepRecord] | None = None

    # ---- adapters ----------------------------------------------------------------------------

    def register_adapter(self, name: str, path, lazy: bool = False) -> None:
        """Register a PEFT folder under `name`, checked against the base model now. lazy: from
        its adapter_config.json and safetensors header only; else every tensor is read and
        checked as well (finite floats), then dropped. Either way the weights are read again
        when a request needs them (adapter_loader.py)."""
        check_name(name)
        spec = read_spec(name, path, self.adapter_layout, header_only=lazy)   # file IO: no lock
        with self.lock:
            self.cache.register(spec)

    def register_store(self, store, lazy: bool = True, progress=None) -> list[str]:
        """Attach an `AdapterStore` (or a folder of PEFT folders) and register its adapters
        (lazily: config and header only) unless a name is registered already; folders added
        later are found by `resolve_adapter` (adapter_stores.py). Returns its names.
        `progress(done, total)`: called per folder of the store."""
        return self.adapter_stores.attach(store, lazy, progress)

    def resolve_adapter(self, name: str) -> bool:
        """True if `name` is registered or is now, from an attached store's folder (lazily);
        False if there is no such adapter; AdapterError if the folder is not a valid adapter."""
        return self.adapter_stores.resolve(name)

    def resolvable_adapters(self) -> list[str]:
        """Registered adapters and the folders of attached stores (checked when resolved)."""
        return self.adapter_stores.resolvable()

    def register_adapter_tensors(self, name: str, config, tensors: dict) -> None:
        """Same from an adapter_config dict (or LoraConfig) and PEFT-keyed tensors in memory;
        the page copy stays in memory (there is no file to read it from again)."""
        check_name(name)
        host = build_host_adapter(name, config, tensors, self.adapter_layout.targets,
                                  self.runner.pages.shape[1], self.config.max_lora_rank,
                                  self.runner.dtype, exclude=self.adapter_layout.exclude)
        if self.parallel:
            host = self.parallel.shard_host(host)
        with self.lock:
            self.cache.register(host)

    def unregister_adapter(self, name: str) -> None:
        with self.lock:
            if name not in self.cache:
                raise EngineError(f"adapter {name!r} is not registered")
            if any(s.adapter == name for s in self.requests.values()):
                raise EngineError(f"adapter {name!r} is used by queued or running requests")
            self.cache.unregister(name)

    def adapters(self) -> list[str]:
        return self.cache.names()

    def has_adapter(self, name: str) -> bool:
        """Registered (O(1): `adapters()` sorts every name, thousands of them per request)."""
        return name in self.cache

    # ---- requests ----------------------------------------------------------------------------

    def add_request(self, request_id: str, prompt_ids, adapter: str | None = None,
                    params: SamplingParams | None = None, tenant: str | None = None) -> None:
        """tenant: who sends it (an API key id); admission round-robins across tenants."""
        with self.lock:
            params = params or SamplingParams()
            if self.parallel is not None and not self.parallel.healthy():
                raise EngineError(self.parallel.failure())
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
            if adapter is not None and (not is_valid_name(adapter) or adapter not in self.cache):
                raise RequestError(f"unknown adapter {adapter!r}; registered: "
                                   f"{', '.join(self.adapters()[:8]) or 'none'}")
            if len(prompt_ids) >= self.max_model_len:
                raise RequestError(f"prompt has {len(prompt_ids)} tokens; the model's context is "
                                   f"{self.max_model_len} (prompt + at least one new token)")
            if params.stop and self.tokenizer is None:
                raise RequestError("stop strings need a tokenizer")
            if params.json_object and self.tokenizer is None:
                raise RequestError("json_object needs a tokenizer (token texts)")
            max_tokens = min(params.max_tokens, self.max_model_len - len(prompt_ids))
            pages = self.kv.layout.pages_for_tokens(len(prompt_ids) + max_tokens)
            if adapter is not None:
                pages += self.cache.specs[adapter].num_pages
            if pages > self.pool.num_pages:
                raise RequestError(f"request needs {pages} pages (prompt {len(prompt_ids)} + "
                                   f"max_tokens {max_tokens} tokens of KV, plus its adapter); the "
                                   f"pool has {self.pool.num_pages}")
            seq = Sequence(request_id, prompt_ids, adapter, params, time.monotonic(), max_tokens,
                           tenant=tenant)
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
            if self.parallel is not None and not self.parallel.healthy():
                return outputs + self._fail_all(self.parallel.failure())
            self._finish_adapter_loads(outputs)
            batch = self.scheduler.schedule()
            for seq in batch.aborted:
                seq.error = "first-token deadline exceeded while queued"
                outputs.append(self._final(seq))
            if batch.seqs:
                started = time.perf_counter()
                seqs, logits = self.runner.run(batch.seqs, batch.num_new_tokens, self.kv)
                if getattr(self.runner, "prompt_rows", None):
                    score_prompts(self.runner.prompt_rows, self.runner.prompt_logits)
                for seq, n in zip(batch.seqs, batch.num_new_tokens):
                    seq.num_computed_tokens += n
                if seqs:      # a row with NaN/Inf logits fails its own request, no other
                    seqs, logits = self._drop_nonfinite(seqs, logits, outputs)
                if seqs:      # else only middle chunks of long prompts ran: nothing to sample
                    tokens = sample_rows(seqs, logits, self.eos_ids, self._json_vocab)
                    logprobs = sampled_logprobs(seqs, logits, tokens)
                    for i, (seq, token) in enumerate(zip(seqs, tokens.tolist())):
                        outputs.append(self._postprocess(seq, token, logprobs and logprobs[i]))
                self.num_steps += 1
                if self.step_log is not None:
                    self.step_log.append(self._record(batch, time.perf_counter() - started))
            waiting_for_loads = not batch.seqs and not outputs and bool(self.cache.loading)
        if waiting_for_loads:       # nothing could run: wait for a read, without the lock
            self.cache.loader.wait(ADAPTER_LOAD_WAIT_S)
        return outputs

    def _finish_adapter_loads(self, outputs: list[RequestOutput]) -> None:
        """Take the loader's finished reads; a file found bad fails its queued requests alone."""
        for name, error in self.cache.poll():
            for seq in self.scheduler.fail_waiting(name, error):
                outputs.append(self._final(seq))

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
        """Finish each row whose logits [B, V] hold NaN or +Inf, or are all -Inf (a broken
        adapter, an overflow), with an error, and return the other rows: sampling one bad row
        would raise and fail every request in the batch. The row maximum finds them (NaN
        propagates through it) at a fifth of the cost of testing every logit; a -Inf logit
        beside finite ones is harmless (probability 0)."""
        finite = torch.isfinite(logits.amax(dim=-1))
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

    def _fail_all(self, message: str) -> list[RequestOutput]:
        """Finish every running and waiting request with `message` (tensor parallelism broke:
        nothing can run any more)."""
        outputs = self.fail_running(message)
        for seq in list(self.scheduler.waiting):
            self.scheduler.waiting.remove(seq)
            seq.error = message
            self.scheduler.finish(seq, "error")
            outputs.append(self._output(seq))
        return outputs

    def _json_vocab(self) -> JsonVocab:
        """Each token's text, for the JSON constraint (decoded once, on first use)."""
        if self._json_vocab_cache is None:
            self._json_vocab_cache = JsonVocab.of(self.tokenizer, self.model.config.vocab_size)
        return self._json_vocab_cache

    def _postprocess(self, seq: Sequence, token: int,
                     logprob: TokenLogprob | None) -> RequestOutput:
        """EOS, stop strings, max_tokens and text (output.py) for one sampled token."""
        self.num_generated += 1
        reason = self.output.append(seq, token, logprob, self.eos_ids)
        if reason is not None:
            self.scheduler.finish(seq, reason)
        return self._output(seq)

    def _output(self, seq: Sequence) -> RequestOutput:
        """The tokens and text not yet handed out (output.py holds back text that may change)."""
        out = self.output.output(seq)
        if out.finished:
            self.requests.pop(seq.request_id, None)
        return out

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
                if out.request_id not in results:
                    results[out.request_id] = Completion.start(out)
                results[out.request_id].add(out)
        return [results[i] for i in ids]

    def stats(self) -> dict:
        with self.lock:
            return {**self.pool.stats(), **self.cache.stats(),
                    "queue_depth": len(self.scheduler.waiting),
                    "running": len(self.scheduler.running),
                    "preemptions": self.scheduler.num_preemptions,
                    "queue_wait_seconds_sum": self.scheduler.queue_wait_seconds,
                    "queue_wait_seconds_count": self.scheduler.num_admitted,
                    "steps": self.num_steps, "generated_tokens": self.num_generated,
                    **self.memory_stats(),
                    **(self.parallel.stats.as_dict() if self.parallel else {})}

    def healthy(self) -> bool:
        """False once a tensor-parallel worker has died or failed (steps raise EngineError)."""
        return self.parallel is None or self.parallel.healthy()

    def close(self) -> None:
        """Stop tensor-parallel workers (also done when the engine is collected)."""
        if self.parallel is not None:
            self.parallel.close()

    def memory_stats(self) -> dict:
        """How the memory plan (memory.py) came out: bytes of the pool, the weights and their
        packed copies, the budget, and the tokens of KV the pool holds."""
        plan = self.memory
        stats = {"page_bytes": plan.page_bytes, "pool_bytes": plan.pool_bytes,
                 "weight_bytes": plan.weight_bytes, "packed_weight_bytes": plan.packed_bytes,
                 "kv_token_capacity": self.kv_token_capacity}
        if plan.budget_bytes is not None:
            stats["memory_budget_bytes"] = plan.budget_bytes
        return stats
