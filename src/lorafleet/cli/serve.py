"""`lorafleet serve`: the OpenAI-compatible HTTP server over one base model and its adapters."""
from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import signal
import socket
import sys
from pathlib import Path

from lorafleet.cli.progress import (add_progress_argument, count_through, load_base,
                                    progress_bar)
from lorafleet.errors import ConfigError
from lorafleet.models.dtype import add_dtype_argument, resolve_dtype
from lorafleet.serve.engine_config import VOCAB_MODES
from lorafleet.serve.memory import DEFAULT_MEMORY_FRACTION, format_bytes

log = logging.getLogger("lorafleet.serve")

EXAMPLES = """\
examples:
  lorafleet serve --model ./tiny-llama --adapter sql=runs/sql/adapter
  lorafleet serve --model ./llama --enable-lora --lora-modules sql=./sql support=./support \\
      --max-loras 4 --api-key sk-admin          # vLLM's spellings
  lorafleet serve --config serve.yaml --port 9000   # file values, the command line overrides
  lorafleet serve --model ./llama --quantize nf4 --adapter-dir ./adapters \\
      --api-keys keys.json --port 8000
  curl http://127.0.0.1:8000/v1/completions -H 'Content-Type: application/json' \\
      -d '{"model": "sql", "prompt": "SELECT", "max_tokens": 16}'

keys file (JSON): {"sk-team-a": ["sql", "support"], "sk-admin": "*"}
See docs/serve.md for every endpoint.
"""


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "serve", help="serve the base model and many adapters over an OpenAI-compatible API",
        description="Start an HTTP server (OpenAI /v1/completions, /v1/chat/completions, "
                    "/v1/models, run-time adapter loading, /metrics) over one base model; the "
                    "request's `model` field picks an adapter.",
        epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", metavar="FILE", help="YAML, TOML or JSON file of these flags "
                   "(`max-loras: 4`); the command line overrides it")
    p.add_argument("--model", required=True, help="base model folder (config.json, "
                   "safetensors, tokenizer.json)")
    p.add_argument("--served-model-name", help="the id clients use for the bare base model "
                   "(default: the model folder's name)")
    p.add_argument("--adapter", action="append", default=[], metavar="NAME=DIR",
                   help="register a PEFT adapter folder at start-up (repeatable)")
    p.add_argument("--lora-modules", nargs="+", action="extend", default=[],
                   metavar="NAME=DIR|JSON",
                   help="vLLM's spelling of --adapter: NAME=DIR, or JSON {\"name\": ..., "
                        "\"path\": ..., \"base_model_name\": ...}")
    p.add_argument("--enable-lora", action="store_true",
                   help="accepted for vLLM compatibility: adapters are always on")
    p.add_argument("--max-loras", type=int, default=_default("max_adapters_per_step"),
                   help="distinct adapters in one batch (vLLM's meaning; default: no limit "
                        "beyond the pool)")
    p.add_argument("--max-lora-rank", type=int, default=_default("max_lora_rank"),
                   help="largest adapter rank accepted (default %(default)s)")
    p.add_argument("--adapter-dir", help="folder that POST /v1/load_lora_adapter may load "
                   "from (paths are confined to it); without it run-time loading is off")
    p.add_argument("--quantize", choices=["nf4"], help="store the base model in 4-bit NF4 "
                   "(QLoRA's format); adapters stay in full precision")
    add_dtype_argument(p, help_suffix="; serving takes bf16 wherever the device computes it")
    p.add_argument("--device", default="cpu", help="torch device (default cpu)")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=8000, help="port (0 = any free port)")
    p.add_argument("--api-keys", metavar="FILE", help="JSON file {key: [adapters] or \"*\"}; "
                   "without it (and --api-key) the server accepts every request")
    p.add_argument("--api-key", action="append", default=[], metavar="KEY",
                   help="a key that may use every adapter (repeatable; vLLM's flag); also read "
                        "from the LORAFLEET_API_KEY and VLLM_API_KEY environment variables")
    p.add_argument("--chat-template", metavar="FILE|TEMPLATE",
                   help="Jinja chat template for /v1/chat/completions: a file, or the "
                        "template itself (default: the tokenizer's)")
    p.add_argument("--uvicorn-log-level", default="warning",
                   choices=["critical", "error", "warning", "info", "debug", "trace"],
                   help="uvicorn's own log level (default %(default)s)")
    p.add_argument("--enable-log-requests", dest="log_requests", action="store_true",
                   default=False, help="log each generation request (id, model, tokens, "
                                       "sampling options; never the prompt text)")
    p.add_argument("--disable-log-requests", dest="log_requests", action="store_false",
                   help="no request log (the default; accepted for vLLM compatibility)")
    p.add_argument("--max-queue", type=int, default=_default("max_queue", server=True),
                   help="sequences accepted and not finished before answering 429 "
                        "(default %(default)s)")
    p.add_argument("--max-model-len", type=int,
                   help="context per sequence, prompt + completion (default: the model's)")
    p.add_argument("--max-tokens-limit", type=int,
                   help="largest max_tokens a request may ask (default: --max-model-len)")
    budget = p.add_mutually_exclusive_group()
    budget.add_argument("--memory-budget", metavar="SIZE",
                        help="memory for weights + KV/adapter pool, e.g. 12GiB, 800MB, or a "
                             "fraction of available memory such as 0.8 (default: the pool "
                             "holds the running batch's KV and adapters, within "
                             f"{DEFAULT_MEMORY_FRACTION * 100:.0f}%% of available memory)")
    budget.add_argument("--gpu-memory-utilization", type=float, metavar="FRACTION",
                        help="vLLM's spelling of --memory-budget FRACTION: the share of "
                             "available memory (free RAM on CPU, free GPU memory on CUDA) "
                             "for weights + pool")
    p.add_argument("--num-pages", type=int, default=_default("num_pages"),
                   help="override: pages in the unified KV/adapter pool (one page = "
                        "hidden_size numbers); default: sized from the memory budget")
    p.add_argument("--max-cpu-loras", type=int, default=_default("max_cpu_loras"),
                   help="adapters whose page copy stays in host memory after they enter the "
                        "pool, least recently used dropped first (vLLM's flag; default: none, "
                        "an evicted adapter is read from disk again)")
    p.add_argument("--tensor-parallel-size", "-tp", type=int,
                   default=_default("tensor_parallel_size"),
                   help="split the model over N processes on this machine (Megatron-style, "
                        "adapters split to match; gloo on CPU, NCCL on CUDA with rank r on "
                        "cuda:r): Llama family only (default %(default)s)")
    p.add_argument("--tensor-parallel-vocab", choices=VOCAB_MODES,
                   default=_default("tensor_parallel_vocab"),
                   help="with --tensor-parallel-size: embedding and lm_head replicated, or split "
                        "by vocabulary rows (lm_head only, or both); docs/engine.md measures "
                        "them (default %(default)s)")
    p.add_argument("--max-num-seqs", type=int, default=_default("max_num_seqs"),
                   help="running batch size cap (default %(default)s)")
    p.add_argument("--max-num-batched-tokens", type=int,
                   default=_default("max_num_batched_tokens"),
                   help="tokens per engine step: decode rows plus prompt chunks "
                        "(default %(default)s)")
    p.add_argument("--no-chunked-prefill", dest="chunked_prefill", action="store_false",
                   help="a step is all prefill or all decode (default: steps mix decode rows "
                        "with prompt chunks, long prompts over several steps)")
    p.add_argument("--max-body-bytes", type=int,
                   help="largest request body accepted; larger ones get 413 (default 8 MiB)")
    p.add_argument("--drain-timeout", type=float, default=60.0,
                   help="seconds SIGTERM waits for in-flight requests before exiting")
    add_progress_argument(p)
    p.set_defaults(func=run)


def _default(name: str, server: bool = False):
    """The default of an EngineConfig (or, server=True, ServerConfig) field: the one copy of
    the defaults, which the flags only repeat."""
    if server:
        from lorafleet.api.state import ServerConfig as config_class
    else:
        from lorafleet.serve.engine import EngineConfig as config_class

    return {f.name: f.default for f in dataclasses.fields(config_class)}[name]


def memory_budget(args) -> int | float | None:
    """--memory-budget SIZE | --gpu-memory-utilization FRACTION, as EngineConfig takes it."""
    from lorafleet.serve.memory import parse_memory_size

    if args.gpu_memory_utilization is not None:
        if not 0 < args.gpu_memory_utilization <= 1:
            raise ConfigError("--gpu-memory-utilization must be in (0, 1], got "
                              f"{args.gpu_memory_utilization}")
        return float(args.gpu_memory_utilization)
    if args.memory_budget is not None:
        return parse_memory_size(args.memory_budget, "--memory-budget")
    return None


def parse_adapter_args(values: list, flag: str = "--adapter",
                       adapters: dict[str, Path] | None = None) -> dict[str, Path]:
    """NAME=DIR values (and, for --lora-modules, vLLM's JSON form {"name", "path",
    "base_model_name"}, as a string or, from a config file, a mapping) -> {name: folder}."""
    adapters = {} if adapters is None else adapters
    for value in values:
        if isinstance(value, str) and value.lstrip().startswith("{"):
            try:
                value = json.loads(value)
            except json.JSONDecodeError as exc:
                raise ConfigError(f"{flag}: invalid JSON {value!r}: {exc.msg}") from exc
        if isinstance(value, dict):
            unknown = sorted(set(value) - {"name", "path", "base_model_name"})
            if unknown or not isinstance(value.get("name"), str) \
                    or not isinstance(value.get("path"), str):
                raise ConfigError(f"{flag} expects {{\"name\": ..., \"path\": ...[, "
                                  f"\"base_model_name\": ...]}}, got {value!r}")
            name, folder = value["name"], value["path"]
        elif isinstance(value, str):
            name, sep, folder = value.partition("=")
            if not sep or not name or not folder:
                raise ConfigError(f"{flag} expects NAME=DIR, got {value!r}")
        else:
            raise ConfigError(f"{flag} expects NAME=DIR, got {value!r}")
        if name in adapters:
            raise ConfigError(f"{flag} {name!r} is given twice")
        adapters[name] = Path(folder)
    return adapters


# Environment variables holding an admin key each, as vLLM reads VLLM_API_KEY.
API_KEY_ENV = ("LORAFLEET_API_KEY", "VLLM_API_KEY")


def api_keys(args):
    """ApiKeys from --api-keys FILE, --api-key KEY (every adapter) and the environment; None
    when none is given (an open server)."""
    from lorafleet.api.auth import ALL_ADAPTERS, ApiKeys, _parse_grant

    grants = {}
    if args.api_keys:
        if not Path(args.api_keys).is_file():
            # Never echo the value: a user who typed a key here would see it in logs.
            raise ConfigError("--api-keys expects a JSON keys file, and the file given does "
                              "not exist (its name is not shown: it may be a key); to pass a "
                              "key itself use --api-key KEY")
        grants.update(ApiKeys.from_file(args.api_keys).grants)
    extra = list(args.api_key) + [os.environ[v] for v in API_KEY_ENV if os.environ.get(v)]
    for key in extra:
        if not key.strip():
            raise ConfigError("--api-key: empty key")
        grants[key] = _parse_grant(Path("--api-key"), key, ALL_ADAPTERS)
    return ApiKeys(grants) if grants else None


def build(args):
    """The engine, tokenizer and app the arguments describe (also used by tests)."""
    from lorafleet.adapters.store import check_name
    from lorafleet.api.server import ServerConfig, create_app
    from lorafleet.api.state import read_generation_defaults
    from lorafleet.lora.peft_format import adapter_folder
    from lorafleet.models import load_tokenizer
    from lorafleet.models.config import ModelConfig
    from lorafleet.models.tokenizer import read_chat_template
    from lorafleet.serve import Engine, EngineConfig

    adapters = parse_adapter_args(args.adapter)
    parse_adapter_args(args.lora_modules, "--lora-modules", adapters)
    keys = api_keys(args)
    if args.adapter_dir and not Path(args.adapter_dir).is_dir():
        raise ConfigError(f"--adapter-dir {args.adapter_dir} is not a folder")
    served_name = args.served_model_name or Path(args.model).resolve().name
    for name in adapters:
        check_name(name)
        if name == served_name:
            raise ConfigError(f"--adapter {name!r}: the name is the served model's name; a "
                              f"request for {name!r} could not tell them apart")
    budget = memory_budget(args)
    tokenizer = load_tokenizer(args.model)
    if args.chat_template:
        tokenizer.chat_template = read_chat_template(args.chat_template)
    dtype = resolve_dtype(args.dtype, args.model, args.device, prefer_half=True)
    if args.tensor_parallel_size > 1:
        # The engine loads it (rank 0's shard) and each worker loads its own from the folder;
        # with --quantize nf4 each rank quantizes its shard.
        model = args.model
        positions = ModelConfig.from_hf(args.model).max_position_embeddings
    else:
        model = load_base(args, dtype)
        positions = model.config.max_position_embeddings
    if args.max_model_len is not None and args.max_model_len > positions:
        raise ConfigError(f"--max-model-len {args.max_model_len} exceeds the model's "
                          f"max_position_embeddings ({positions})")
    engine = Engine(model, tokenizer, EngineConfig(
        memory_budget=budget, num_pages=args.num_pages, max_num_seqs=args.max_num_seqs,
        max_num_batched_tokens=args.max_num_batched_tokens,
        enable_chunked_prefill=args.chunked_prefill, max_cpu_loras=args.max_cpu_loras,
        max_lora_rank=args.max_lora_rank, max_adapters_per_step=args.max_loras,
        max_model_len=args.max_model_len, dtype=dtype, device=args.device,
        tensor_parallel_size=args.tensor_parallel_size,
        tensor_parallel_vocab=args.tensor_parallel_vocab,
        quantize=args.quantize if args.tensor_parallel_size > 1 else None))
    if args.adapter_dir:
        # Every folder of the dir can be named by a request (resolved on demand); an explicit
        # --adapter of the same name, registered after, wins.
        engine.register_store(args.adapter_dir, lazy=True,
                              progress=progress_bar(args, "adapter dir", "adapter"))
    # --adapter / --lora-modules folders are read whole (every tensor checked) at start-up; a
    # training run or checkpoint folder stands for its adapter/
    for name, folder in count_through(progress_bar(args, "adapters", "adapter"),
                                      adapters.items()):
        engine.register_adapter(name, str(adapter_folder(folder)))
    max_model_len = args.max_model_len or engine.max_model_len
    config = ServerConfig(
        model_name=served_name,
        max_model_len=max_model_len, max_tokens_limit=args.max_tokens_limit,
        max_queue=args.max_queue, adapter_dir=args.adapter_dir, api_keys=keys,
        vocab_size=engine.model.config.vocab_size, log_requests=args.log_requests,
        generation_defaults=read_generation_defaults(args.model),
        **({"max_body_bytes": args.max_body_bytes} if args.max_body_bytes else {}))
    return engine, tokenizer, create_app(engine, tokenizer, config), config


def _startup_log(args, engine, config, url: str) -> None:
    cfg = engine.model.config
    stats = engine.stats()
    hidden = getattr(cfg, "hidden_size", None)
    log.info("lorafleet serve")
    log.info("  model     %s (%s, %s layers, hidden %s, vocab %s), %s%s", args.model,
             type(engine.model).__name__, getattr(cfg, "num_hidden_layers", "?"), hidden,
             cfg.vocab_size, str(engine.runner.dtype).removeprefix("torch."),
             ", base in NF4" if args.quantize else "")
    log.info("  served as %r", config.model_name)
    names = engine.adapters()
    log.info("  adapters  %d: %s", len(names), ", ".join(sorted(names)) or "none")
    log.info("  run-time  %s", f"loading from {Path(args.adapter_dir).resolve()}"
             if args.adapter_dir else "loading disabled (no --adapter-dir)")
    plan = engine.memory
    log.info("  pool      %d pages of %s numbers = %s: %d tokens of KV (%d free pages; sized "
             "by %s)", plan.num_pages, hidden, format_bytes(plan.pool_bytes),
             stats.get("kv_token_capacity", 0), stats.get("pages_free", 0), plan.source)
    log.info("  memory    weights %s%s; budget %s of %s available",
             format_bytes(plan.weight_bytes),
             ", packed copies replace them" if plan.release_plain_weights else
             f", packed copies {format_bytes(plan.packed_bytes)}" if plan.packed_bytes else "",
             format_bytes(plan.budget_bytes) if plan.budget_bytes is not None else "unknown",
             format_bytes(plan.available_bytes) if plan.available_bytes is not None
             else "unknown")
    log.info("  limits    max_model_len %d, max_tokens %d, max_queue %d, batch %d",
             config.max_model_len, config.max_tokens_limit, config.max_queue,
             args.max_num_seqs)
    log.info("  auth      %s", f"{len(config.api_keys.grants)} API keys"
             if config.api_keys else "none (every request accepted)")
    log.info("  listening %s/v1  (metrics %s/metrics)", url, url)


def run(args) -> int:
    import uvicorn

    engine, _, app, config = build(args)
    sock = socket.socket(socket.AF_INET6 if ":" in args.host else socket.AF_INET)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((args.host, args.port))
    except OSError as exc:
        raise ConfigError(f"cannot listen on {args.host}:{args.port}: {exc}") from exc
    port = sock.getsockname()[1]  # the real one when --port 0
    host = f"[{args.host}]" if ":" in args.host else args.host
    _startup_log(args, engine, config, f"http://{host}:{port}")
    if args.host not in ("127.0.0.1", "localhost", "::1"):
        log.warning("listening on %s: the server speaks plain HTTP; put TLS in front of it",
                    args.host)
    server = uvicorn.Server(uvicorn.Config(app, log_level=args.uvicorn_log_level,
                                           timeout_graceful_shutdown=args.drain_timeout))
    # uvicorn answers SIGTERM by closing the listener, waiting for in-flight requests and the
    # app's shutdown (the engine drains), then re-raising the signal with the handler that was
    # installed before it: this one, so a drained server exits 0 instead of "killed".
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    server.run(sockets=[sock])
    return 0
