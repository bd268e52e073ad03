"""The tokenizer of a checkpoint folder: `tokenizer.json` through the `tokenizers` library, the
special tokens from `tokenizer_config.json` (and `generation_config.json`'s EOS), and the chat
template rendered with jinja2 the way transformers renders it (sandboxed, trim_blocks,
lstrip_blocks, `raise_exception`, special tokens as variables).
"""
from __future__ import annotations

import json
from datetime import datetime
from pathlib import Path
from typing import Any

from lorafleet.errors import ConfigError, ModelLoadError
from lorafleet.models.config import read_json

SPECIAL_TOKEN_NAMES = ("bos_token", "eos_token", "unk_token", "pad_token")


def _read_json(file: Path) -> dict[str, Any]:
    """An optional file of the folder: {} when absent."""
    return read_json(file, ModelLoadError) if file.is_file() else {}


def _token_text(value) -> str | None:
    """tokenizer_config stores a special token as a string or as an AddedToken dict."""
    if isinstance(value, dict):
        return value.get("content")
    return value


def _compile_chat_template(template: str):
    import jinja2
    import jinja2.ext
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        # jinja's own tojson escapes HTML characters; chat templates expect plain JSON
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators,
                          sort_keys=sort_keys)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[jinja2.ext.loopcontrols])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return env.from_string(template)


def read_chat_template(value: str) -> str:
    """--chat-template: a file's text, or the value itself when it is no file (vLLM's rule);
    checked by compiling it now, not at the first chat record or request."""
    path = Path(value)
    try:
        is_file = path.is_file()
    except OSError:   # a template too long to be a path
        is_file = False
    try:
        text = path.read_text() if is_file else value
    except OSError as exc:
        raise ConfigError(f"--chat-template {value}: cannot read: {exc}") from exc
    try:
        _compile_chat_template(text)
    except Exception as exc:  # jinja2's TemplateSyntaxError, among others
        raise ConfigError(f"--chat-template: not a valid Jinja template: {exc}") from exc
    return text


class Tokenizer:
    def __init__(self, backend, special_tokens: dict[str, str], chat_template: str | None = None,
                 extra_eos_ids: list[int] | None = None):
        self.backend = backend  # tokenizers.Tokenizer
        self.special_tokens = special_tokens  # "bos_token" -> "<s>", ...
        self.chat_template = chat_template
        self._template = None   # (source, compiled): recompiled when chat_template is set anew
        self.bos_token_id = self.token_to_id(special_tokens.get("bos_token"))
        self.eos_token_id = self.token_to_id(special_tokens.get("eos_token"))
        eos = [] if self.eos_token_id is None else [self.eos_token_id]
        self.eos_token_ids = eos + [i for i in extra_eos_ids or [] if i not in eos]

    @property
    def vocab_size(self) -> int:
        return self.backend.get_vocab_size(with_added_tokens=True)

    def token_to_id(self, token: str | None) -> int | None:
        return None if token is None else self.backend.token_to_id(token)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Text -> ids. `add_special_tokens` applies tokenizer.json's post-processor (e.g. a
        BOS), as transformers' `encode` does."""
        return self.backend.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        return self.backend.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def apply_chat_template(self, messages: list[dict[str, Any]],
                            add_generation_prompt: bool = True, tokenize: bool = False,
                            **kwargs) -> str | list[int]:
        """Render `messages` ([{"role", "content"}]) with the checkpoint's chat template; with
        tokenize=True return ids (encoded without adding special tokens, as transformers does:
        the template writes them)."""
        if self.chat_template is None:
            raise ConfigError("this tokenizer has no chat_template (tokenizer_config.json or "
                              "chat_template.jinja)")
        if self._template is None or self._template[0] != self.chat_template:
            self._template = (self.chat_template, _compile_chat_template(self.chat_template))
        variables = {**self.special_tokens, **kwargs}
        text = self._template[1].render(messages=messages,
                                        add_generation_prompt=add_generation_prompt, **variables)
        return self.encode(text, add_special_tokens=False) if tokenize else text


def load_tokenizer(path: str | Path) -> Tokenizer:
    """Read `tokenizer.json` (+ tokenizer_config.json, chat_template.jinja,
    generation_config.json when present) from a checkpoint folder."""
    from tokenizers import Tokenizer as Backend

    path = Path(path)
    file = path / "tokenizer.json"
    if not file.is_file():
        raise ModelLoadError(f"no tokenizer.json in {path} (only the fast-tokenizer format is "
                             "read)")
    try:
        backend = Backend.from_file(str(file))
    except Exception as exc:  # the Rust library raises a bare Exception on a malformed file
        raise ModelLoadError(f"{file}: cannot be read by tokenizers ({exc})") from exc
    config = _read_json(path / "tokenizer_config.json")
    special = {name: _token_text(config.get(name)) for name in SPECIAL_TOKEN_NAMES
               if _token_text(config.get(name)) is not None}
    template = config.get("chat_template")
    if isinstance(template, list):  # named templates: [{"name": "default", "template": ...}]
        named = {t["name"]: t["template"] for t in template}
        template = named.get("default", next(iter(named.values()), None))
    template_file = path / "chat_template.jinja"  # transformers v5 saves it beside the config
    if template is None and template_file.is_file():
        template = template_file.read_text()
    generation = _read_json(path / "generation_config.json")
    eos = generation.get("eos_token_id")
    extra_eos = [eos] if isinstance(eos, int) else list(eos or [])
    return Tokenizer(backend, special, template, extra_eos)
