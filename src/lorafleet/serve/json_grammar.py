"""Constrained decoding for `response_format: {"type": "json_object"}`: the output is one JSON
object, whatever the model's weights.

A JSON recognizer over characters (`step`: state, char -> next state, or None where the char
would break JSON) runs over each candidate token's text. Sampling is unchanged where the model's
choice is valid; otherwise the token is drawn again from the same distribution with invalid
tokens removed (rejection with removal: the same as sampling from the masked, renormalized
distribution), greedy rows take the most likely valid token. Nothing is scanned for a valid
choice, so a model that writes JSON pays almost nothing. When the object is complete the
request's EOS token is chosen; when the tokens left (max_tokens) are just enough to close
every open string and bracket, the shortest closing text is forced one character at a time
(every byte-level or byte-fallback vocabulary has single-character tokens), so even a random
model's output parses.

States are tuples (immutable, hashable): (mode, stack, aux) where stack is the open
containers ("{" / "["), mode what may come next.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from lorafleet.models.sampling import probabilities

WHITESPACE = " \t\n\r"
DIGITS = "0123456789"
START = ("start", "", "")
# Re-draws of a sampled row before it takes the most likely valid token instead.
MAX_REDRAWS = 32

# number sub-states that are a complete number (the next non-number char ends it)
_NUMBER_END = {"zero", "int", "frac", "exp"}
# closing(): the next character toward the end of the object, for each mode that has a fixed one
_CLOSE_CHAR = {"start": "{", "string": '"', "esc": "n", "key_or_close": "}",
               "value_or_close": "]", "key": '"', "colon": ":", "value": "0"}


def _after_value(stack: str):
    return ("done", "", "") if not stack else ("after", stack, "")


def step(state, ch: str):
    """The state after `ch`, or None if `ch` cannot continue a JSON object here."""
    mode, stack, aux = state
    if mode == "string":      # aux: "k" inside a key, "v" inside a value
        if ch == '"':
            return ("colon", stack, "") if aux == "k" else _after_value(stack)
        if ch == "\\":
            return ("esc", stack, aux)
        return state if ch >= " " else None     # control characters must be escaped
    if mode == "esc":
        if ch in '"\\/bfnrt':
            return ("string", stack, aux)
        return ("u0", stack, aux) if ch == "u" else None
    if mode[0] == "u" and mode[1:].isdigit():
        if ch not in "0123456789abcdefABCDEF":
            return None
        n = int(mode[1:]) + 1
        return ("string", stack, aux) if n == 4 else (f"u{n}", stack, aux)
    if mode == "literal":     # aux: the letters still to come
        if ch != aux[0]:
            return None
        return _after_value(stack) if len(aux) == 1 else ("literal", stack, aux[1:])
    if mode.startswith("num_"):
        sub = mode[4:]
        nxt = _number(sub, ch)
        if nxt is not None:
            return (f"num_{nxt}", stack, "")
        if sub not in _NUMBER_END:
            return None
        return step(_after_value(stack), ch)     # the char ends the number: read it after
    if ch in WHITESPACE:      # between tokens, and after the object
        return state
    if mode == "start":
        return ("key_or_close", "{", "") if ch == "{" else None
    if mode == "done":
        return None
    if mode == "key_or_close":
        if ch == "}":
            return _after_value(stack[:-1])
        return ("string", stack, "k") if ch == '"' else None
    if mode == "key":
        return ("string", stack, "k") if ch == '"' else None
    if mode == "colon":
        return ("value", stack, "") if ch == ":" else None
    if mode == "after":
        if ch == ",":
            return ("key", stack, "") if stack[-1] == "{" else ("value", stack, "")
        if ch == ("}" if stack[-1] == "{" else "]"):
            return _after_value(stack[:-1])
        return None
    if mode in ("value", "value_or_close"):
        if mode == "value_or_close" and ch == "]":
            return _after_value(stack[:-1])
        if ch == '"':
            return ("string", stack, "v")
        if ch == "{":
            return ("key_or_close", stack + "{", "")
        if ch == "[":
            return ("value_or_close", stack + "[", "")
        if ch == "-":
            return ("num_minus", stack, "")
        if ch in DIGITS:
            return ("num_zero" if ch == "0" else "num_int", stack, "")
        for word in ("true", "false", "null"):
            if ch == word[0]:
                return ("literal", stack, word[1:])
    return None


def _number(sub: str, ch: str) -> str | None:
    """JSON's number grammar, one char: the next sub-state, or None if `ch` is not part of it."""
    if sub == "minus":
        return "zero" if ch == "0" else "int" if ch in DIGITS else None
    if sub in ("zero", "int"):
        if ch in DIGITS and sub == "int":
            return "int"
        return "dot" if ch == "." else "e" if ch in "eE" else None
    if sub in ("dot", "frac"):
        if ch in DIGITS:
            return "frac"
        return "e" if ch in "eE" and sub == "frac" else None
    if sub == "e":
        return "esign" if ch in "+-" else "exp" if ch in DIGITS else None
    if sub in ("esign", "exp"):
        return "exp" if ch in DIGITS else None
    return None


def feed(state, text: str):
    """The state after `text`, or None if it breaks JSON (an empty text is refused: a token
    that writes nothing would let the output run on without progress)."""
    if not text:
        return None
    for ch in text:
        state = step(state, ch)
        if state is None:
            return None
    return state


def closing(state) -> str:
    """The shortest text that completes the object from `state`."""
    out = []
    for _ in range(10_000):
        mode, stack, aux = state
        if mode == "done":
            break
        ch = _CLOSE_CHAR.get(mode)
        if ch is None:
            if mode == "literal":
                ch = aux[0]
            elif (mode[0] == "u" and mode[1:].isdigit()) or (
                    mode.startswith("num_") and mode[4:] not in _NUMBER_END):
                ch = "0"      # a digit finishes an escape or a number
            else:  # after a value (or a complete number) inside a container
                ch = "}" if stack[-1] == "{" else "]"
        out.append(ch)
        state = step(state, ch)
    return "".join(out)


@dataclass
class JsonVocab:
    """Each token's text alone, and a token for each single character (the closing text)."""

    texts: list[str]
    chars: dict[str, int]

    @classmethod
    def of(cls, tokenizer, vocab_size: int) -> "JsonVocab":
        texts = []
        for i in range(vocab_size):
            try:
                texts.append(tokenizer.decode([i]))
            except Exception:  # ids past the tokenizer's vocabulary (a padded embedding)
                texts.append("")
        chars: dict[str, int] = {}
        for i, t in enumerate(texts):
            if len(t) == 1:
                chars.setdefault(t, i)
        return cls(texts, chars)


def constrain_json(seqs, logits: torch.Tensor, tokens: torch.Tensor, vocab: JsonVocab,
                   eos_ids) -> torch.Tensor:
    """Replace each json_object row's token by a valid one (module docstring) and advance that
    row's recognizer state (kept on the sequence as `json_state`)."""
    tokens = tokens.clone()
    texts, chars = vocab.texts, vocab.chars
    for row, seq in enumerate(seqs):
        params = seq.params
        if not params.json_object:
            continue
        state = getattr(seq, "json_state", None) or START
        token = int(tokens[row])
        if state[0] == "done":
            eos = list(params.eos_token_ids if params.eos_token_ids is not None else eos_ids)
            if eos:
                tokens[row] = eos[0]
            elif chars.get(" ") is not None:
                tokens[row] = chars[" "]
            continue
        left = seq.max_tokens - len(seq.output_ids)
        close = closing(state)
        if left <= len(close) + 1 and close[0] in chars:
            token = chars[close[0]]
            new = feed(state, texts[token])
        else:       # the model's own token, fed once when it is valid (the usual case)
            new = feed(state, texts[token])
            if new is None:
                token = _valid_choice(seq, logits[row], state, texts)
                new = feed(state, texts[token]) if token is not None else None
        if new is None:      # no valid token at all: close with what the vocabulary has
            token = chars.get(close[0], int(tokens[row]))
            new = feed(state, texts[token]) or state
        seq.json_state = new
        tokens[row] = token
    return tokens


def _valid_choice(seq, logits: torch.Tensor, state, texts: list[str]) -> int | None:
    params = seq.params
    if params.temperature > 0:
        probs = probabilities(logits[None], params.temperature, params.top_k, params.top_p,
                              params.min_p)[0]
        for _ in range(MAX_REDRAWS):
            if float(probs.sum()) <= 0:
                break
            token = int(torch.multinomial(probs, 1, generator=seq.generator)[0])
            if feed(state, texts[token]) is not None:
                return token
            probs[token] = 0.0
    order = logits.argsort(descending=True).tolist()
    for token in order:
        if token < len(texts) and feed(state, texts[token]) is not None:
            return token
    return None
