"""What a request hands back: its tokens checked for EOS, stop strings and max_tokens, its text
decoded incrementally, and the pieces not yet handed out (`RequestOutput`, `Completion`).

Incremental detokenization (vLLM's `detokenize_incrementally`, the scheme `tokenizers`'
`DecodeStream` implements too). Decoding a token alone is wrong for most tokenizers (a
SentencePiece token drops its leading space at the start of a text; a byte-level token may hold
half a UTF-8 character), and decoding the whole output every step makes a request's life
quadratic. So each step decodes a short window: the tokens since `prefix_offset` (the last
decoded chunk, as context) and the new ones since `read_offset`:

    prefix = decode(ids[prefix_offset:read_offset]); window = decode(ids[prefix_offset:])
    pending = window[len(prefix):]      # the text of the new tokens, in context

When `pending` ends in a complete character it becomes final and both offsets move up; while it
is empty or ends in U+FFFD (a character whose bytes have not all arrived) the new tokens stay
pending. The
work per step is two decodes of a few tokens, whatever the output's length; the stop-string
search covers only the changed tail plus `max(len(stop)) - 1` characters before it, which is
where a new occurrence can start. Not `DecodeStream` itself: it cannot hand out the pending
tail when a request finishes, and the engine works with any tokenizer that has `decode(ids)`.

Text that may still change is held back from the stream: a trailing run of U+FFFD in the
pending text (an incomplete character: one per byte so far with byte-fallback tokenizers, one
in all for byte-level ones) and the last `max(len(stop)) - 1` characters (a possible beginning
of a stop string). A finished request hands out everything left. The result equals decoding the whole
output every step (tested against that slow twin) as long as no character spans more than
`MAX_PENDING_TOKENS` tokens; past that (a stream of invalid bytes), the pending text is taken
as decoded, replacement characters included, so the work stays bounded.
"""
from __future__ import annotations

import time
from dataclasses import dataclass

from .sequence import Sequence

# Tokens that may stay pending (no complete character yet) before their text is taken as final:
# a UTF-8 character is at most 4 bytes, so only invalid bytes or many text-less tokens (skipped
# special tokens) inside one character get here; bounds the per-step decode to this many tokens.
MAX_PENDING_TOKENS = 64
REPLACEMENT = "\ufffd"

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
    # With params.prompt_logprobs, on a request's first output: one entry per prompt token
    # (None for the first), as `logprobs`.
    prompt_logprobs: list[TokenLogprob | None] | None = None


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
    prompt_logprobs: list[TokenLogprob | None] | None = None

    @classmethod
    def start(cls, out: RequestOutput) -> "Completion":
        return cls(out.request_id, [], "", None, [] if out.logprobs is not None else None,
                   out.prompt_tokens, 0, prompt_logprobs=out.prompt_logprobs)

    def add(self, out: RequestOutput) -> None:
        """Append one streamed piece."""
        self.token_ids += out.new_token_ids
        self.text += out.new_text
        if out.logprobs is not None:
            self.logprobs += out.logprobs
        self.finish_reason, self.error = out.finish_reason, out.error
        self.completion_tokens = out.completion_tokens


class IncrementalText:
    """One request's output text, decoded a few tokens at a time (module docstring).

    Positions are in the whole text; only `text = whole[start:]` is kept: the characters not yet
    handed out, the pending ones, and the `hold` characters a stop string may start in."""

    def __init__(self, tokenizer, stop: list[str] | tuple[str, ...] = ()):
        self.tokenizer, self.stop = tokenizer, list(stop)
        self.hold = max([0, *(len(s) - 1 for s in self.stop)])
        self.prefix_offset = self.read_offset = 0       # into the output token ids
        self.text, self.start = "", 0
        self.stable_len = 0          # the whole text's length up to read_offset (final)
        self.sent_len = 0            # handed out so far
        self.stopped = False         # a stop string was found; the text ends before it

    @property
    def length(self) -> int:
        return self.start + len(self.text)

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids) if ids else ""

    def update(self, ids: list[int]) -> bool:
        """Take the output token ids after new ones were appended; True if a stop string now
        occurs (the text is cut before it)."""
        prefix = self._decode(ids[self.prefix_offset:self.read_offset])
        pending = self._decode(ids[self.prefix_offset:])[len(prefix):]
        searched = self.stable_len - self.start            # local index where pending starts
        self.text = self.text[:searched] + pending
        # Text-less tokens (a skipped special token; a SentencePiece "▁" that a decoder strips
        # at the start of a text) stay pending too: the next window keeps real context.
        complete = pending and not pending.endswith(REPLACEMENT)
        if complete or len(ids) - self.read_offset > MAX_PENDING_TOKENS:
            self.stable_len += len(pending)
            self.prefix_offset, self.read_offset = self.read_offset, len(ids)
        if self.stop:
            search_from = max(0, searched - self.hold)
            cuts = [i for i in (self.text.find(s, search_from) for s in self.stop) if i >= 0]
            if cuts:
                self.text = self.text[:max(min(cuts), self.sent_len - self.start)]
                self.stopped = True
        return self.stopped

    def take(self, finished: bool) -> str:
        """The text not handed out yet, less what may still change unless `finished`."""
        visible = self.length
        if not finished:         # a trailing U+FFFD run of the pending text may still change
            pending = self.text[max(0, self.stable_len - self.start):]
            visible -= len(pending) - len(pending.rstrip(REPLACEMENT))
            visible = max(self.sent_len, visible - self.hold)
        piece = self.text[self.sent_len - self.start:visible - self.start]
        self.sent_len = visible
        # Keep only what a later step needs: unsent text and the stop search's look-back.
        keep_from = min(self.sent_len, self.stable_len - self.hold)
        if keep_from > self.start:
            self.text, self.start = self.text[keep_from - self.start:], keep_from
        return piece


class OutputProcessor:
    """Postprocessing of sampled tokens, per request: EOS, stop strings, max_tokens, text."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.texts: dict[str, IncrementalText] = {}

    def append(self, seq: Sequence, token: int, logprob: TokenLogprob | None,
               eos_ids: set[int]) -> str | None:
        """Record a sampled token; the finish reason if it ends the request, else None.
        eos_ids: the model's, unless the request's params name their own."""
        if seq.first_token_time is None:
            seq.first_token_time = time.monotonic()
        if getattr(seq.params, "eos_token_ids", None) is not None:
            eos_ids = seq.params.eos_token_ids
        if token in eos_ids and not seq.params.ignore_eos:
            return "stop"             # EOS ends the completion and is not part of it
        if token in getattr(seq.params, "stop_token_ids", ()):
            return "stop"             # so do the request's stop tokens
        seq.output_ids.append(token)
        if logprob is not None:
            seq.logprobs.append(logprob)
        text = self._text(seq)
        if text is not None and text.update(seq.output_ids):
            return "stop"
        if len(seq.output_ids) >= seq.max_tokens:
            return "length"
        return None

    def _text(self, seq: Sequence) -> IncrementalText | None:
        if self.tokenizer is None:
            return None
        text = self.texts.get(seq.request_id)
        if text is None:
            text = self.texts[seq.request_id] = IncrementalText(self.tokenizer, seq.params.stop)
        return text

    def output(self, seq: Sequence) -> RequestOutput:
        """The tokens and text not yet handed out (text that may still change held back)."""
        finished = seq.is_finished
        new_ids = seq.output_ids[seq.sent_token_count:]
        new_logprobs = seq.logprobs[seq.sent_token_count:] if seq.params.logprobs else None
        prompt_logprobs = None
        if getattr(seq.params, "prompt_logprobs", None) is not None and \
                not seq.prompt_logprobs_sent:
            prompt_logprobs = list(seq.prompt_logprobs) or [None]
            seq.prompt_logprobs_sent = True
        seq.sent_token_count = len(seq.output_ids)
        text = self._text(seq)
        new_text = "" if text is None else text.take(finished)
        if finished:
            self.texts.pop(seq.request_id, None)
        return RequestOutput(seq.request_id, new_ids, new_text, finished, seq.finish_reason,
                             new_logprobs, len(seq.prompt_ids), len(seq.output_ids), seq.error,
                             prompt_logprobs)
