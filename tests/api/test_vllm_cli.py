"""`lorafleet serve` with vLLM's spellings: the flags parse to the same settings as ours, a
config file sets defaults the command line overrides, unknown flags get a suggestion, a key
given where a file is expected is never printed, and a server started the vLLM way answers the
`openai` client."""
from __future__ import annotations

import json
import re
import time

import httpx
import openai
import pytest
from serve_process import serve_subprocess

from lorafleet.cli import build_parser, main as cli_main
from lorafleet.cli.config_file import apply_config_file
from lorafleet.cli.serve import api_keys, parse_adapter_args
from lorafleet.errors import ConfigError
from lorafleet.models.tokenizer import read_chat_template


def parse(argv: list[str]):
    parser = build_parser()
    apply_config_file(parser, argv)
    return parser.parse_args(argv)


def test_vllm_flags_mean_ours(tmp_path):
    args = parse(["serve", "--model", "m", "--enable-lora", "--lora-modules", "a=/x/a",
                  '{"name": "b", "path": "/x/b", "base_model_name": "m"}', "--max-loras", "3",
                  "--max-lora-rank", "16", "--max-cpu-loras", "5",
                  "--gpu-memory-utilization", "0.5", "--api-key", "k1", "--api-key", "k2",
                  "--dtype", "bf16", "--uvicorn-log-level", "info", "--enable-log-requests",
                  "--served-model-name", "tiny", "-v"])
    assert args.verbose and args.log_requests and args.enable_lora
    assert (args.max_loras, args.max_lora_rank, args.max_cpu_loras) == (3, 16, 5)
    assert parse_adapter_args(args.lora_modules, "--lora-modules") == {
        "a": __import__("pathlib").Path("/x/a"), "b": __import__("pathlib").Path("/x/b")}
    assert args.api_key == ["k1", "k2"] and args.uvicorn_log_level == "info"
    assert not parse(["serve", "--model", "m", "--disable-log-requests"]).log_requests
    assert not parse(["-v", "serve", "--model", "m"]).log_requests
    assert parse(["-v", "serve", "--model", "m"]).verbose
    with pytest.raises(ConfigError, match="lora-modules"):
        parse_adapter_args(['{"name": "a"}'], "--lora-modules")
    with pytest.raises(ConfigError, match="twice"):
        parse_adapter_args(["a=/x", "a=/y"], "--lora-modules")


def test_config_file_sets_defaults_the_command_line_overrides(tmp_path):
    yaml_file = tmp_path / "serve.yaml"
    yaml_file.write_text("model: ./m\nmax-loras: 4\nmax_num_seqs: 7\nlora-modules:\n"
                         "  - a=/x/a\nenable-log-requests: true\nno-chunked-prefill: true\n")
    args = parse(["serve", "--config", str(yaml_file), "--max-num-seqs", "9"])
    assert (args.model, args.max_loras, args.max_num_seqs) == ("./m", 4, 9)
    assert args.lora_modules == ["a=/x/a"] and args.log_requests and not args.chunked_prefill
    toml_file = tmp_path / "serve.toml"
    toml_file.write_text('model = "./t"\ndtype = "float32"\nport = 0\n')
    args = parse(["serve", "--config", str(toml_file)])
    assert (args.model, args.dtype, args.port) == ("./t", "float32", 0)
    for text, message in [("max-lorass: 4\n", "did you mean 'max_loras'"),
                          ("max-loras: many\n", "max-loras"),
                          ("dtype: int3\n", "dtype"), ("- a\n", "mapping")]:
        yaml_file.write_text(text)
        with pytest.raises(ConfigError, match=message):
            parse(["serve", "--config", str(yaml_file)])


def test_unknown_flag_suggests_the_closest(capsys):
    with pytest.raises(SystemExit):
        cli_main(["serve", "--model", "m", "--gpu-mem-utilization", "0.5"])
    err = capsys.readouterr().err
    assert "unrecognized arguments: --gpu-mem-utilization" in err
    assert "did you mean --gpu-memory-utilization?" in err
    with pytest.raises(SystemExit):
        cli_main(["serv", "--model", "m"])
    assert "did you mean 'serve'?" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli_main(["serve", "--model", "m", "--dtype", "bfloat15"])
    assert "did you mean 'bfloat16'?" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exc:
        cli_main(["--version"])
    assert exc.value.code == 0
    from lorafleet import __version__
    assert capsys.readouterr().out.strip() == f"lorafleet {__version__}"


def test_a_key_given_as_the_keys_file_is_never_printed(tmp_path, monkeypatch):
    monkeypatch.delenv("LORAFLEET_API_KEY", raising=False)
    monkeypatch.delenv("VLLM_API_KEY", raising=False)
    secret = "sk-very-secret-1234"
    with pytest.raises(ConfigError) as exc:
        api_keys(parse(["serve", "--model", "m", "--api-keys", secret]))
    assert secret not in str(exc.value) and "--api-key" in str(exc.value)
    assert api_keys(parse(["serve", "--model", "m"])) is None
    monkeypatch.setenv("VLLM_API_KEY", "sk-env")
    keys_file = tmp_path / "keys.json"
    keys_file.write_text(json.dumps({"sk-team": ["a"]}))
    keys = api_keys(parse(["serve", "--model", "m", "--api-keys", str(keys_file),
                           "--api-key", "sk-flag"]))
    assert keys.lookup("sk-env").is_admin and keys.lookup("sk-flag").is_admin
    assert not keys.lookup("sk-team").is_admin and keys.lookup("sk-other") is None


def test_chat_template_file_or_inline(tmp_path):
    inline = "{% for m in messages %}{{ m['content'] }}{% endfor %}"
    assert read_chat_template(inline) == inline
    path = tmp_path / "t.jinja"
    path.write_text(inline + "!")
    assert read_chat_template(str(path)) == inline + "!"
    with pytest.raises(ConfigError, match="Jinja"):
        read_chat_template("{% for m in messages %}")


@pytest.mark.slow
def test_serve_started_the_vllm_way_answers_the_openai_client(llama_dir, adapter_root,
                                                              tmp_path):
    config = tmp_path / "serve.yaml"
    config.write_text(f"model: {llama_dir}\nmax-model-len: 256\nnum-pages: 4096\n"
                      "port: 1\n")            # the command line's --port 0 overrides it
    log_path = tmp_path / "serve.log"
    template = "{% for m in messages %}<<{{ m['content'] }}>>{% endfor %}"
    with serve_subprocess(
            ["--config", str(config),
             "--port", "0", "--served-model-name", "tiny", "--enable-lora",
             "--lora-modules", f"alpha={adapter_root / 'alpha'}",
             json.dumps({"name": "beta", "path": str(adapter_root / "beta"),
                         "base_model_name": "tiny"}),
             "--max-loras", "2", "--max-lora-rank", "16", "--max-cpu-loras", "4",
             "--api-key", "sk-flag", "--dtype", "float32", "--chat-template", template,
             "--uvicorn-log-level", "warning", "--disable-log-requests",
             "--enable-log-requests", "-v"],
            log_path, 90, env={"VLLM_API_KEY": "sk-env"}) as proc:
        url = proc.url
        for key in ("sk-flag", "sk-env"):
            client = openai.OpenAI(base_url=url + "/v1", api_key=key, max_retries=0,
                                   timeout=60)
            assert {"tiny", "alpha", "beta"} <= {m.id for m in client.models.list().data}
            out = client.completions.create(model="beta", prompt="hello", max_tokens=3,
                                            temperature=0)
            assert out.choices[0].finish_reason in ("stop", "length")
        chat = client.chat.completions.create(
            model="alpha", messages=[{"role": "user", "content": "hi"}], max_tokens=2,
            temperature=0)
        assert chat.usage.prompt_tokens == len(
            httpx.post(url + "/tokenize", json={"prompt": "<<hi>>",
                                                "add_special_tokens": False},
                       headers={"Authorization": "Bearer sk-env"}).json()["tokens"])
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=url + "/v1", api_key="sk-wrong",
                          max_retries=0).models.list()
        log = log_path.read_text()
        assert "request cmpl-" in log and "request chatcmpl-" in log, log
        assert "sk-flag" not in log and "sk-env" not in log
