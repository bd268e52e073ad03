"""Issue 16's API for evaluation and client libraries, against oracles: prompt logprobs (echo)
equal transformers' log-softmax; penalties, logit_bias, min_tokens and stop_token_ids equal
transformers' generation with its logits processors (or the OpenAI formula, step by step);
json_object outputs parse; batches of prompts; /tokenize, /detokenize, /version; vllm: metrics;
generation_config defaults."""
from __future__ import annotations

import json
from types import SimpleNamespace

import openai
import pytest
import torch

from lorafleet.serve import Engine, EngineConfig, SamplingParams

EOS = 1   # tests/hf_fixtures.py


@pytest.fixture(scope="module")
def engine(llama_dir, tokenizer):
    # small steps: long prompts run as several chunks (prompt logprobs across steps)
    return Engine(str(llama_dir), tokenizer, EngineConfig(max_num_batched_tokens=16))


@pytest.fixture(scope="module")
def hf(llama_dir):
    import transformers
    model = transformers.AutoModelForCausalLM.from_pretrained(llama_dir,
                                                              dtype=torch.float32).eval()
    model.generation_config.pad_token_id = 0
    return model


def hf_greedy(hf, prompt, max_new, **kwargs):
    with torch.no_grad():
        out = hf.generate(torch.tensor([prompt]), do_sample=False, max_new_tokens=max_new,
                          **kwargs)
    ids = out[0, len(prompt):].tolist()
    return ids[:ids.index(EOS)] if EOS in ids else ids


PROMPTS = ["The quick brown fox jumps over the lazy dog and keeps running far away",
           "hello", "a b c d e f g h i j k l m n o p q r s t u v w x y z"]


def test_prompt_logprobs_equal_transformers_log_softmax(engine, tokenizer, reference):
    prompts = [tokenizer.encode(p) for p in PROMPTS]
    assert max(map(len, prompts)) > 16          # over several prefill steps
    params = [SamplingParams(max_tokens=2, prompt_logprobs=3), SamplingParams(max_tokens=2),
              SamplingParams(max_tokens=2, prompt_logprobs=0)]
    outs = engine.generate(prompts, params=params)
    assert outs[1].prompt_logprobs is None        # a request that did not ask gets none
    for prompt, out, p in zip(prompts, outs, params):
        if p.prompt_logprobs is None:
            continue
        expected = reference.log_softmax(prompt, None)
        got = out.prompt_logprobs
        assert len(got) == len(prompt) and got[0] is None
        for t in range(1, len(prompt)):
            want = float(expected[t - 1, prompt[t]])
            value = got[t][prompt[t]] if isinstance(got[t], dict) else got[t]
            assert abs(value - want) < 1e-4, (t, value, want)
            if p.prompt_logprobs:
                top = expected[t - 1].topk(3)
                assert set(top.indices.tolist()) <= set(got[t])
                for i, v in zip(top.indices.tolist(), top.values.tolist()):
                    assert abs(got[t][i] - v) < 1e-4


def test_repetition_penalty_equals_transformers_generate(engine, tokenizer, hf):
    prompt = tokenizer.encode(PROMPTS[0])
    for penalty in (1.5, 0.8):
        ours = engine.generate([prompt], params=SamplingParams(
            max_tokens=12, repetition_penalty=penalty))[0].token_ids
        assert ours == hf_greedy(hf, prompt, 12, repetition_penalty=penalty,
                                 eos_token_id=EOS), penalty
    # and it changes something: without it the greedy output differs
    plain = engine.generate([prompt], params=SamplingParams(max_tokens=12))[0].token_ids
    assert plain == hf_greedy(hf, prompt, 12, eos_token_id=EOS)


def test_logit_bias_and_min_tokens_equal_transformers_processors(engine, tokenizer, hf):
    from transformers.generation.logits_process import (LogitsProcessorList,
                                                        MinNewTokensLengthLogitsProcessor,
                                                        SequenceBiasLogitsProcessor)
    prompt = tokenizer.encode(PROMPTS[2])
    bias = {EOS: 30.0, 7: 5.0}
    ours = engine.generate([prompt], params=SamplingParams(
        max_tokens=10, logit_bias=bias, min_tokens=4))[0]
    processors = LogitsProcessorList([
        SequenceBiasLogitsProcessor({(t,): b for t, b in bias.items()}),
        MinNewTokensLengthLogitsProcessor(len(prompt), 4, [EOS])])
    expected = hf_greedy(hf, prompt, 10, logits_processor=processors, eos_token_id=EOS)
    assert ours.token_ids == expected and len(expected) == 4 and ours.finish_reason == "stop"


def test_frequency_presence_penalties_step_by_step(engine, tokenizer, hf):
    prompt = tokenizer.encode(PROMPTS[1])
    ours = engine.generate([prompt], params=SamplingParams(
        max_tokens=10, frequency_penalty=1.5, presence_penalty=0.5, ignore_eos=True))[0]
    ids, out = list(prompt), []
    with torch.no_grad():
        for _ in range(10):     # OpenAI's formula over the output so far, then greedy
            logits = hf(torch.tensor([ids])).logits[0, -1].clone()
            for token in set(out):
                logits[token] -= 1.5 * out.count(token) + 0.5
            token = int(logits.argmax())
            out.append(token)
            ids.append(token)
    assert ours.token_ids == out


def test_min_p_one_and_stop_token_ids(engine, tokenizer):
    prompt = tokenizer.encode(PROMPTS[0])
    greedy = engine.generate([prompt], params=SamplingParams(max_tokens=8,
                                                             ignore_eos=True))[0].token_ids
    # min_p = 1 keeps only the most likely token: sampling at any temperature is greedy
    sampled = engine.generate([prompt], params=SamplingParams(
        max_tokens=8, temperature=1.5, min_p=1.0, seed=3, ignore_eos=True))[0].token_ids
    assert sampled == greedy
    stop_at = greedy[3]
    first = greedy.index(stop_at)
    out = engine.generate([prompt], params=SamplingParams(
        max_tokens=8, stop_token_ids=[stop_at], ignore_eos=True))[0]
    assert out.token_ids == greedy[:first] and out.finish_reason == "stop"


def test_penalty_rows_leave_the_others_exact(engine, tokenizer):
    """A batch mixing rows with and without penalties: the plain rows equal their solo run."""
    prompts = [tokenizer.encode(p) for p in PROMPTS]
    solo = [engine.generate([p], params=SamplingParams(max_tokens=6))[0].token_ids
            for p in prompts]
    mixed = engine.generate(prompts, params=[
        SamplingParams(max_tokens=6), SamplingParams(max_tokens=6, repetition_penalty=2.0,
                                                     logit_bias={5: 50.0}),
        SamplingParams(max_tokens=6)])
    assert mixed[0].token_ids == solo[0] and mixed[2].token_ids == solo[2]
    assert 5 in mixed[1].token_ids


# ---- over HTTP ---------------------------------------------------------------------------------

def test_echo_logprobs_of_a_batch_of_token_prompts_as_vllm(client, tokenizer, reference):
    prompts = [tokenizer.encode(PROMPTS[0]), tokenizer.encode(PROMPTS[2])]
    resp = client.completions.create(model="base", prompt=prompts, echo=True, logprobs=1,
                                     max_tokens=1, temperature=0)
    assert [c.index for c in resp.choices] == [0, 1]
    assert resp.usage.prompt_tokens == sum(map(len, prompts))
    for prompt, choice in zip(prompts, resp.choices):
        lp = choice.logprobs
        expected = reference.log_softmax(prompt, None)
        assert len(lp.token_logprobs) == len(prompt) + 1       # the prompt, then the new token
        assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
        for t in range(1, len(prompt)):
            assert abs(lp.token_logprobs[t] - float(expected[t - 1, prompt[t]])) < 1e-4
            assert abs(max(lp.top_logprobs[t].values()) - float(expected[t - 1].max())) < 1e-4
        assert choice.text.startswith(tokenizer.decode(prompt))
        assert lp.text_offset[0] == 0 and lp.text_offset == sorted(lp.text_offset)


def test_batch_of_text_prompts_with_n(client, tokenizer, reference):
    resp = client.completions.create(model="alpha", prompt=PROMPTS[:2], n=2, max_tokens=4,
                                     temperature=0)
    assert [c.index for c in resp.choices] == [0, 1, 2, 3]
    for i, prompt in enumerate(PROMPTS[:2]):
        want = tokenizer.decode(reference(tokenizer.encode(prompt), "alpha", 4))
        assert resp.choices[2 * i].text == resp.choices[2 * i + 1].text == want


def test_streamed_echo_logprobs(http, tokenizer, reference):
    prompt = tokenizer.encode(PROMPTS[1] + " world")
    resp = http.post("/v1/completions", json={"model": "base", "prompt": prompt, "echo": True,
                                              "logprobs": 0, "max_tokens": 2, "stream": True})
    events = [json.loads(line[6:]) for line in resp.text.splitlines()
              if line.startswith("data: ") and line != "data: [DONE]"]
    first = events[0]["choices"][0]
    assert first["text"] == tokenizer.decode(prompt)
    assert first["logprobs"]["token_logprobs"][0] is None
    expected = reference.log_softmax(prompt, None)
    for t in range(1, len(prompt)):
        assert abs(first["logprobs"]["token_logprobs"][t] - float(expected[t - 1, prompt[t]])) \
            < 1e-4


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_json_object_outputs_parse(client, seed):
    for max_tokens in (6, 40):
        chat = client.chat.completions.create(
            model="base", messages=[{"role": "user", "content": "give me json"}],
            response_format={"type": "json_object"}, temperature=1.0, seed=seed,
            max_tokens=max_tokens)
        assert isinstance(json.loads(chat.choices[0].message.content), dict)
        done = client.completions.create(
            model="alpha", prompt="{", temperature=0.0, max_tokens=max_tokens, seed=seed,
            extra_body={"response_format": {"type": "json_object"}})
        assert isinstance(json.loads(done.choices[0].text), dict)


def test_tools_and_json_schema_are_clear_400s(client):
    with pytest.raises(openai.BadRequestError, match="tool calling is not supported"):
        client.chat.completions.create(
            model="base", messages=[{"role": "user", "content": "x"}],
            tools=[{"type": "function", "function": {"name": "f", "parameters": {}}}])
    with pytest.raises(openai.BadRequestError, match="json_object"):
        client.chat.completions.create(
            model="base", messages=[{"role": "user", "content": "x"}],
            response_format={"type": "json_schema", "json_schema": {"name": "x"}})


def test_penalties_over_http_equal_the_engine(client, tokenizer, hf):
    prompt = tokenizer.encode(PROMPTS[0])
    resp = client.completions.create(model="base", prompt=prompt, max_tokens=8, temperature=0,
                                     extra_body={"repetition_penalty": 1.5})
    assert resp.choices[0].text == tokenizer.decode(
        hf_greedy(hf, prompt, 8, repetition_penalty=1.5, eos_token_id=EOS))
    many_stops = [f"never{i}" for i in range(20)]
    assert client.completions.create(model="base", prompt=prompt, max_tokens=2,
                                     stop=many_stops).choices[0].text is not None


def test_tokenize_detokenize_version_tokenizer_info(http, tokenizer):
    text = PROMPTS[0]
    got = http.post("/tokenize", json={"model": "base", "prompt": text}).json()
    assert got["tokens"] == tokenizer.encode(text) and got["count"] == len(got["tokens"])
    assert got["max_model_len"] == 128
    raw = http.post("/tokenize", json={"prompt": text, "add_special_tokens": False}).json()
    assert raw["tokens"] == tokenizer.encode(text, add_special_tokens=False)
    chat = http.post("/tokenize", json={"messages": [{"role": "user", "content": "hi"}]}).json()
    assert chat["tokens"] == tokenizer.apply_chat_template([{"role": "user", "content": "hi"}],
                                                           tokenize=True)
    assert http.post("/detokenize", json={"tokens": got["tokens"]}).json()["prompt"] == \
        tokenizer.decode(got["tokens"])
    assert http.post("/detokenize", json={"tokens": [10**6]}).status_code == 400
    assert http.post("/tokenize", json={}).status_code == 400
    from lorafleet import __version__
    assert http.get("/version").json() == {"version": __version__}
    info = http.get("/tokenizer_info").json()
    assert info["eos_token"] == "</s>" and info["chat_template"]


def test_vllm_metric_names(client, http):
    client.completions.create(model="base", prompt="hi", max_tokens=2)
    text = http.get("/metrics").text
    for name in ('vllm:num_requests_running{model_name="base"}',
                 'vllm:num_requests_waiting{model_name="base"}',
                 'vllm:prompt_tokens_total{model_name="base"}',
                 'vllm:generation_tokens_total{model_name="base"}',
                 'vllm:time_to_first_token_seconds_bucket',
                 'vllm:e2e_request_latency_seconds_count{model_name="base"}',
                 'vllm:request_success_total', 'vllm:kv_cache_usage_perc'):
        assert name in text, name
    prompt_total = float(text.split('vllm:prompt_tokens_total{model_name="base"} ')[1].split()[0])
    lorafleet_total = sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
                          if line.startswith("lorafleet_prompt_tokens_total{"))
    assert prompt_total == lorafleet_total > 0


def test_generation_config_defaults(tmp_path):
    from lorafleet.api.generation import _sampling_params
    from lorafleet.api.protocol import CompletionRequest
    from lorafleet.api.state import read_generation_defaults

    (tmp_path / "generation_config.json").write_text(json.dumps(
        {"temperature": 0.6, "top_p": 0.9, "top_k": 20, "repetition_penalty": 1.1,
         "do_sample": True, "max_length": 99}))
    defaults = read_generation_defaults(tmp_path)
    assert defaults == {"temperature": 0.6, "top_p": 0.9, "top_k": 20,
                        "repetition_penalty": 1.1}
    state = SimpleNamespace(config=SimpleNamespace(generation_defaults=defaults))
    left_out = _sampling_params(state, CompletionRequest(model="m", prompt="x"), 4, False, 0,
                                1)[0]
    assert (left_out.temperature, left_out.top_p, left_out.top_k,
            left_out.repetition_penalty) == (0.6, 0.9, 20, 1.1)
    given = _sampling_params(state, CompletionRequest(model="m", prompt="x", temperature=1.0,
                                                      top_k=-1, repetition_penalty=1.0),
                             4, False, 0, 1)[0]
    assert (given.temperature, given.top_k, given.repetition_penalty) == (1.0, 0, 1.0)
    assert read_generation_defaults(tmp_path / "missing") == {}


def test_max_tokens_zero_with_echo_scores_the_prompt_only(client, http, tokenizer, reference):
    prompt = tokenizer.encode(PROMPTS[0])
    resp = client.completions.create(model="base", prompt=prompt, echo=True, logprobs=0,
                                     max_tokens=0)
    choice = resp.choices[0]
    assert choice.text == tokenizer.decode(prompt) and resp.usage.completion_tokens == 0
    expected = reference.log_softmax(prompt, None)
    assert len(choice.logprobs.token_logprobs) == len(prompt)
    assert choice.logprobs.token_logprobs[0] is None
    for t in range(1, len(prompt)):
        assert abs(choice.logprobs.token_logprobs[t] - float(expected[t - 1, prompt[t]])) < 1e-4
    for extra in ({"echo": False}, {"echo": True, "stream": True}):
        resp = http.post("/v1/completions", json={"model": "base", "prompt": "hi",
                                                  "max_tokens": 0, **extra})
        assert resp.status_code == 400 and resp.json()["error"]["param"] == "max_tokens"
