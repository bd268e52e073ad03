"""OpenAI logprobs over real HTTP with the official client: completions `logprobs: N` and chat
`logprobs` + `top_logprobs: N` give the oracle's (transformers + peft) top-N alternatives per
position, in each endpoint's shape; streaming gives the same; too many is a 400 naming the
field."""
from __future__ import annotations

import openai
import pytest

PROMPT = "the quick brown fox"
MESSAGES = [{"role": "user", "content": "food : french"}]


def oracle_rows(reference, prompt_ids, adapter, max_tokens):
    """(greedy ids, [T, V] logprob rows predicting each of them) from the oracle."""
    ids = reference(prompt_ids, adapter, max_tokens)
    logp = reference.log_softmax(prompt_ids + ids, adapter)
    return ids, logp[len(prompt_ids) - 1:len(prompt_ids) - 1 + len(ids)]


def test_completions_top_logprobs_match_oracle(client, tokenizer, reference):
    n = 3
    resp = client.completions.create(model="alpha", prompt=PROMPT, max_tokens=6,
                                     temperature=0, logprobs=n)
    ids, rows = oracle_rows(reference, tokenizer.encode(PROMPT), "alpha", 6)
    lp = resp.choices[0].logprobs
    assert len(ids) >= 2 and lp.tokens == [tokenizer.decode([t]) for t in ids]
    for token_id, row, logprob, top in zip(ids, rows, lp.token_logprobs, lp.top_logprobs):
        assert logprob == pytest.approx(row[token_id].item(), abs=1e-4)
        best = row.topk(n)
        expected = {}
        for t, v in zip(best.indices.tolist(), best.values.tolist()):
            expected.setdefault(tokenizer.decode([t]), v)
        assert top.keys() == expected.keys()           # greedy: the chosen one is the top-1
        assert [top[k] for k in expected] == pytest.approx(list(expected.values()), abs=1e-4)


def test_chat_top_logprobs_match_oracle_and_stream(client, tokenizer, reference):
    n = 4
    resp = client.chat.completions.create(model="beta", messages=MESSAGES, max_tokens=6,
                                          temperature=0, logprobs=True, top_logprobs=n)
    prompt_ids = tokenizer.apply_chat_template(MESSAGES, add_generation_prompt=True,
                                               tokenize=True)
    ids, rows = oracle_rows(reference, prompt_ids, "beta", 6)
    content = resp.choices[0].logprobs.content
    assert len(ids) >= 2 and len(content) == len(ids)
    for token_id, row, entry in zip(ids, rows, content):
        assert entry.token == tokenizer.decode([token_id])
        assert entry.bytes == list(entry.token.encode())
        assert entry.logprob == pytest.approx(row[token_id].item(), abs=1e-4)
        best = row.topk(n)
        assert [a.token for a in entry.top_logprobs] == [tokenizer.decode([t])
                                                         for t in best.indices.tolist()]
        assert [a.logprob for a in entry.top_logprobs] == pytest.approx(best.values.tolist(),
                                                                         abs=1e-4)
        assert all(a.bytes == list(a.token.encode()) for a in entry.top_logprobs)
    chunks = list(client.chat.completions.create(model="beta", messages=MESSAGES, max_tokens=6,
                                                 temperature=0, logprobs=True, top_logprobs=n,
                                                 stream=True))
    streamed = [e for c in chunks if c.choices and c.choices[0].logprobs
                for e in c.choices[0].logprobs.content]
    assert [e.model_dump() for e in streamed] == [e.model_dump() for e in content]
    plain = client.chat.completions.create(model="beta", messages=MESSAGES, max_tokens=6,
                                           temperature=0, logprobs=True)
    assert all(e.top_logprobs == [] for e in plain.choices[0].logprobs.content)


@pytest.mark.parametrize("endpoint,extra,field", [
    ("completions", {"logprobs": 6}, "logprobs"),
    ("chat", {"logprobs": True, "top_logprobs": 21}, "top_logprobs"),
    ("chat", {"top_logprobs": 2}, "top_logprobs")])   # without logprobs: true
def test_too_many_top_logprobs_is_400_naming_the_field(client, endpoint, extra, field):
    with pytest.raises(openai.BadRequestError) as info:
        if endpoint == "completions":
            client.completions.create(model="base", prompt="hi", max_tokens=2, **extra)
        else:
            client.chat.completions.create(model="base", messages=MESSAGES, max_tokens=2,
                                           **extra)
    assert info.value.body["param"] == field and field in info.value.body["message"]
    assert client.completions.create(model="base", prompt="hi", max_tokens=2).choices
