"""Incremental detokenization (serve/output.py) against its slow twin, re-decoding the whole
output every step: the same pieces streamed at every step, the same stop step and text, for
random token sequences over a byte-level BPE (GPT-2 style: partial UTF-8 characters inside
tokens) and a byte-fallback SentencePiece-style BPE (Llama style: one token per byte, one U+FFFD
per missing byte); and the work per step does not grow with the output's length."""
from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lorafleet.models.tokenizer import Tokenizer, load_tokenizer
from lorafleet.serve.output import MAX_PENDING_TOKENS, REPLACEMENT, IncrementalText

from hf_fixtures import make_tokenizer

MULTIBYTE = "café naïve 日本語 € 🙂 — ünïcödé "


def _byte_fallback_tokenizer() -> Tokenizer:
    """Llama's tokenizer.json recipe: Metaspace-style "▁", byte-fallback <0xXX> tokens, and a
    decoder that strips the leading space."""
    from tokenizers import Tokenizer as Backend
    from tokenizers import decoders, models, normalizers

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2}
    vocab.update({f"<0x{i:02X}>": 3 + i for i in range(256)})
    pieces = ["▁", *"abcdefghijklmnopqrstuvwxyz.,", "é", "日", "本", "▁a", "ab", "▁ab", "▁s", "to",
              "▁st", "op"]
    vocab.update({p: len(vocab) + i for i, p in enumerate(dict.fromkeys(pieces))})
    merges = [("▁", "a"), ("a", "b"), ("▁a", "b"), ("▁", "s"), ("t", "o"), ("▁s", "t"),
              ("o", "p")]
    backend = Backend(models.BPE(vocab=vocab, merges=merges, byte_fallback=True,
                                 unk_token="<unk>", fuse_unk=True))
    backend.normalizer = normalizers.Sequence([normalizers.Prepend("▁"),
                                               normalizers.Replace(" ", "▁")])
    backend.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(),
                                         decoders.Fuse(), decoders.Strip(" ", 1, 0)])
    backend.add_special_tokens(["<s>", "</s>"])
    return Tokenizer(backend, {"bos_token": "<s>", "eos_token": "</s>"})


@pytest.fixture(scope="module", params=["byte_level", "byte_fallback"])
def tokenizer(request, tmp_path_factory):
    if request.param == "byte_level":
        path = tmp_path_factory.mktemp("bpe")
        make_tokenizer(path)
        return load_tokenizer(path)
    return _byte_fallback_tokenizer()


def reference_stream(tokenizer, ids: list[int], stop: list[str]):
    """The slow twin: decode the whole output after each token. Returns the piece streamed at
    each step, the number of tokens when it finished, and whether a stop string ended it."""
    hold = max((len(s) - 1 for s in stop), default=0)
    sent, pieces = 0, []
    for k in range(1, len(ids) + 1):
        text = tokenizer.decode(ids[:k])
        cuts = [i for i in (text.find(s) for s in stop) if i >= 0]
        if cuts:
            text = text[:min(cuts)]
        finished = bool(cuts) or k == len(ids)
        visible = len(text)
        if not finished:
            visible -= len(text) - len(text.rstrip(REPLACEMENT))
            visible = max(sent, visible - hold)
        pieces.append(text[sent:visible])
        sent = visible
        if finished:
            return pieces, k, bool(cuts)
    return pieces, len(ids), False


def incremental_stream(tokenizer, ids: list[int], stop: list[str]):
    text = IncrementalText(tokenizer, stop)
    pieces = []
    for k in range(1, len(ids) + 1):
        stopped = text.update(ids[:k])
        pieces.append(text.take(finished=stopped or k == len(ids)))
        if stopped:
            return pieces, k, True
    return pieces, len(ids), False


def _token_ids(tokenizer):
    """Byte-level: random ids, weighted towards tokens of multi-byte text so characters split
    often. Byte-fallback: the tokens of random words (multi-byte characters as 2-4 byte tokens,
    the sequence may end inside one), because that decoder rewrites a whole run of byte tokens
    into U+FFFD once an invalid byte joins it ([<0x00>] -> "\x00", [<0x00>, <0x80>] -> two
    U+FFFD): not prefix-stable, so neither full nor incremental decoding is right there.
    Sequences shorter than MAX_PENDING_TOKENS: beyond it pending text is taken as decoded on
    purpose (the documented bound); test_work_per_step_is_bounded covers that regime."""
    max_size = MAX_PENDING_TOKENS - 8
    multibyte = sorted(set(tokenizer.encode(MULTIBYTE * 2, add_special_tokens=False)))
    if tokenizer.backend.decoder.__class__.__name__ == "ByteLevel":
        token = st.one_of(st.integers(0, tokenizer.vocab_size - 1), st.sampled_from(multibyte))
        return st.lists(token, min_size=1, max_size=max_size)
    words = MULTIBYTE.split() + ["ab", "stop", "to", "a.b,c", "été", "🙂😀"]
    encoded = [tokenizer.encode(w, add_special_tokens=False) for w in words]
    specials = [tokenizer.bos_token_id, tokenizer.eos_token_id]
    chunk = st.one_of(st.sampled_from(encoded), st.sampled_from(specials).map(lambda t: [t]))
    return st.lists(chunk, min_size=1, max_size=12).map(
        lambda chunks: [t for c in chunks for t in c][:max_size])


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                  HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_equals_full_redecoding(tokenizer, data):
    ids = data.draw(_token_ids(tokenizer), label="ids")
    full = tokenizer.decode(ids)
    stop = []
    if data.draw(st.booleans(), label="with stop strings") and full.strip(REPLACEMENT):
        # Stop strings that occur (substrings of the full text) and one that may not.
        for _ in range(data.draw(st.integers(1, 3))):
            start = data.draw(st.integers(0, len(full) - 1))
            stop.append(full[start:start + data.draw(st.integers(1, 4))])
        stop.append(data.draw(st.text(min_size=1, max_size=3)))
    expected = reference_stream(tokenizer, ids, stop)
    assert incremental_stream(tokenizer, ids, stop) == expected
    if not expected[2] and tokenizer.backend.decoder.__class__.__name__ == "ByteLevel":
        # Byte-fallback decoding is not prefix-stable ([<0x00>] -> "\x00" but [<0x00>, <0x80>]
        # -> two U+FFFD: a run of byte tokens is replaced whole), so the streamed text of the
        # old full re-decoding can differ from the final decode there; byte-level cannot.
        assert "".join(expected[0]) == full


@pytest.mark.parametrize("stop", [[], ["zzq", "\n\n"]])
def test_work_per_step_is_bounded(tokenizer, stop):
    """Tokens passed to decode and characters kept per step stay flat over a 3,000-token
    output (counts, not time), for ordinary text and for a stream of invalid bytes that never
    completes a character (where MAX_PENDING_TOKENS bounds the window)."""
    calls = []

    class Counting:
        def decode(self, ids):
            calls.append(len(ids))
            return tokenizer.decode(ids)

    text_ids = tokenizer.encode(MULTIBYTE + "to be or not to be . " * 3,
                                add_special_tokens=False)
    invalid = tokenizer.encode("\u00e9", add_special_tokens=False)[:1]     # a lone lead byte
    for stream in (text_ids * (3000 // len(text_ids) + 1), invalid * 3000):
        ids = stream[:3000]
        state = IncrementalText(Counting(), stop)
        decoded, kept, pieces = [], [], []
        for k in range(1, len(ids) + 1):
            calls.clear()
            state.update(ids[:k])
            pieces.append(state.take(finished=k == len(ids)))
            decoded.append(sum(calls))
            kept.append(len(state.text))
        assert max(decoded) <= 2 * (2 * MAX_PENDING_TOKENS + 2)
        assert max(kept) <= 4 * MAX_PENDING_TOKENS
        early, late = decoded[100:400], decoded[-300:]
        assert sum(late) <= 1.5 * sum(early) + 300
        if stream is not text_ids:
            assert "".join(pieces) == tokenizer.decode(ids)      # invalid bytes stay invalid


def test_stop_string_across_tokens_and_held_back(tokenizer):
    """A stop string split over several tokens is found, nothing of it is streamed, and the
    text streamed before it is everything up to it."""
    ids = tokenizer.encode("ab stop here", add_special_tokens=False)
    pieces, finished_at, stopped = incremental_stream(tokenizer, ids, ["stop"])
    first = next(k for k in range(1, len(ids) + 1) if "stop" in tokenizer.decode(ids[:k]))
    assert stopped and finished_at == first
    assert "".join(pieces) == tokenizer.decode(ids).split("stop")[0]
