"""`lorafleet serve` as a user runs it: a subprocess on 127.0.0.1 (any free port), its start-up
log, outputs equal to `lorafleet generate` with the same adapter, and SIGTERM draining an
in-flight stream before a clean exit."""
from __future__ import annotations

import json
import re
import signal
import threading
import time

import httpx
import openai
import pytest
from serve_process import serve_subprocess
from .conftest import ServerThread

from lorafleet.cli import main as cli_main


def lorafleet_generate(capsys, *args) -> dict:
    capsys.readouterr()
    assert cli_main(["generate", *map(str, args), "--json"]) == 0
    return json.loads(capsys.readouterr().out)


@pytest.fixture(scope="module")
def serve_process(llama_dir, adapter_root, tmp_path_factory):
    log_path = tmp_path_factory.mktemp("serve") / "serve.log"
    with serve_subprocess(
            ["--model", str(llama_dir), "--served-model-name", "tiny",
             "--adapter", f"alpha={adapter_root / 'alpha'}", "--adapter-dir", str(adapter_root),
             "--port", "0", "--max-model-len", "256", "--num-pages", "4096",
             "--dtype", "float32"],   # as the in-process generate oracle resolves auto
            log_path, 90) as proc:    # (tests/conftest.py)
        yield proc


@pytest.mark.slow
def test_serve_cli_matches_generate_and_drains_on_sigterm(serve_process, llama_dir,
                                                          adapter_root, capsys):
    log = serve_process.log_path.read_text()
    # --adapter alpha, and the folders of --adapter-dir (registered from their headers)
    listed = re.search(r"adapters  \d+: (.*)", log).group(1).split(", ")
    assert {"alpha", "beta", "gamma"} <= set(listed), log
    for expected in ("model", "served as 'tiny'", "pool      4096 pages",
                     f"loading from {adapter_root.resolve()}", "auth      none"):
        assert expected in log, log
    client = openai.OpenAI(base_url=serve_process.url + "/v1", api_key="unused", max_retries=0,
                           timeout=60)
    # the registered adapter, and the folders of --adapter-dir that a request may name
    listed = {m.id for m in client.models.list().data}
    assert {"tiny", "alpha", "beta", "gamma"} <= listed
    assert all((adapter_root / name).is_dir() for name in listed - {"tiny"})
    for adapter in ("alpha", None):
        args = ["--model", llama_dir, "--prompt", "the quick brown fox", "--max-tokens", 12]
        ref = lorafleet_generate(capsys, *args, *(["--adapter", adapter_root / adapter]
                                                  if adapter else []))
        out = client.completions.create(model=adapter or "tiny", prompt="the quick brown fox",
                                        max_tokens=12, temperature=0)
        assert out.choices[0].text == ref["text"]
        assert out.usage.completion_tokens == len(ref["token_ids"])
    ref = lorafleet_generate(capsys, "--model", llama_dir, "--adapter", adapter_root / "alpha",
                             "--prompt", "food : french", "--max-tokens", 12, "--chat")
    chat = client.chat.completions.create(
        model="alpha", messages=[{"role": "user", "content": "food : french"}],
        max_tokens=12, temperature=0)
    assert chat.choices[0].message.content == ref["text"]

    # SIGTERM while a long stream is in flight: it still completes, then the process exits 0.
    stream = client.completions.create(model="alpha", prompt="to be", max_tokens=240,
                                       temperature=0, stream=True, extra_body={
                                           "ignore_eos": True,
                                           "stream_options": {"include_usage": True}})
    chunks = iter(stream)
    received = [next(chunks)]
    serve_process.send_signal(signal.SIGTERM)
    received += list(chunks)
    assert received[-1].usage.completion_tokens == 240
    assert received[-2].choices[0].finish_reason == "length"
    assert serve_process.wait(timeout=60) == 0
    with pytest.raises(httpx.TransportError):
        httpx.get(serve_process.url + "/health", timeout=5)
    assert "engine stopped" in serve_process.log_path.read_text()


def test_serve_cli_bad_arguments(llama_dir, capsys):
    assert cli_main(["serve", "--model", str(llama_dir), "--adapter", "no-equals-sign"]) == 1
    assert "--adapter expects NAME=DIR" in capsys.readouterr().err
    assert cli_main(["serve", "--model", str(llama_dir), "--api-keys", "/nonexistent.json"]) == 1
    assert "does not exist" in capsys.readouterr().err
    # an adapter named like the served model would be shadowed by it (issue 13)
    assert cli_main(["serve", "--model", str(llama_dir), "--served-model-name", "tiny",
                     "--adapter", "tiny=/x"]) == 1
    assert "served model's name" in capsys.readouterr().err
    assert cli_main(["serve", "--model", str(llama_dir), "--adapter", "../up=/x"]) == 1
    assert "adapter name '../up'" in capsys.readouterr().err
    assert cli_main(["serve", "--model", str(llama_dir), "--max-model-len", "100000"]) == 1
    assert "max_position_embeddings" in capsys.readouterr().err


def test_serve_scheduler_flags_reach_engine_config(llama_dir):
    from lorafleet.cli import build_parser
    from lorafleet.cli.serve import build
    from lorafleet.serve import EngineConfig

    def engine(*flags):
        args = build_parser().parse_args(["serve", "--model", str(llama_dir), "--num-pages",
                                          "256", *flags])
        return build(args)[0]

    default = engine()
    assert default.config.max_num_batched_tokens == EngineConfig.max_num_batched_tokens
    assert default.config.enable_chunked_prefill is True
    chosen = engine("--max-num-batched-tokens", "96", "--no-chunked-prefill")
    assert chosen.config.max_num_batched_tokens == 96
    assert chosen.config.enable_chunked_prefill is False
    assert chosen.scheduler.config.max_num_batched_tokens == 96       # and the scheduler's
    assert chosen.scheduler.config.enable_chunked_prefill is False


def test_serve_quantized_nf4_matches_generate(llama_dir, capsys):
    from lorafleet.cli import build_parser
    from lorafleet.cli.serve import build
    args = build_parser().parse_args(["serve", "--model", str(llama_dir), "--quantize", "nf4",
                                      "--served-model-name", "q", "--num-pages", "1024"])
    engine, _, app, _ = build(args)
    from lorafleet.quant import Linear4bit
    assert any(isinstance(m, Linear4bit) for m in engine.model.modules())
    server = ServerThread(app).start()
    try:
        client = openai.OpenAI(base_url=server.url + "/v1", api_key="x", max_retries=0,
                               timeout=60)
        out = client.completions.create(model="q", prompt="the quick", max_tokens=8,
                                        temperature=0)
    finally:
        server.stop()
    ref = lorafleet_generate(capsys, "--model", llama_dir, "--quantize", "nf4", "--prompt",
                             "the quick", "--max-tokens", 8)
    assert out.choices[0].text == ref["text"]
