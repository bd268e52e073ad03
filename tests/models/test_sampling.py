"""Sampling math against transformers' logits warpers, row by row."""
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from transformers.generation.logits_process import (TemperatureLogitsWarper, TopKLogitsWarper,
                                                    TopPLogitsWarper)

from lorafleet.models.sampling import (apply_temperature, probabilities, sample, top_k_filter,
                                       top_p_filter, token_logprobs)


def test_filters_match_transformers_per_row():
    torch.manual_seed(0)
    logits = torch.randn(4, 50) * 3
    logits[0, :5] = 10.0  # ties at the top
    temps, ks, ps = [0.7, 1.0, 2.0, 0.5], [0, 5, 1, 50], [1.0, 0.9, 0.5, 0.3]
    ours_t = apply_temperature(logits, torch.tensor(temps))
    ours_k = top_k_filter(ours_t, torch.tensor(ks))
    ours_p = top_p_filter(ours_k, torch.tensor(ps))
    for row, (t, k, p) in enumerate(zip(temps, ks, ps)):
        x = logits[row:row + 1]
        x = TemperatureLogitsWarper(t)(None, x)
        torch.testing.assert_close(ours_t[row:row + 1], x)
        if k > 0:
            x = TopKLogitsWarper(k)(None, x)
        assert torch.equal(ours_k[row:row + 1].isinf(), x.isinf())
        if p < 1:
            x = TopPLogitsWarper(p)(None, x)
        assert torch.equal(ours_p[row:row + 1].isinf(), x.isinf()), row


def test_sample_greedy_rows_seeds_and_distribution():
    logits = torch.tensor([[0.0, 1.0, 3.0], [2.0, 1.0, 0.0]])
    assert sample(logits).tolist() == [2, 0]
    gens = [torch.Generator().manual_seed(1), None]
    a = sample(logits, temperature=torch.tensor([1.0, 0.0]), generators=gens)
    assert a[1] == 0  # greedy row
    seeded = [sample(logits, 1.0, generators=[torch.Generator().manual_seed(7)] * 2)
              for _ in range(2)]
    assert torch.equal(seeded[0], seeded[1])
    torch.manual_seed(0)
    draws = sample(logits[:1].expand(4000, 3), 1.0)
    freq = torch.stack([(draws == v).float().mean() for v in range(3)])
    torch.testing.assert_close(freq, logits[0].softmax(-1), atol=0.04, rtol=0)
    assert sample(logits, 1.0, top_k=1).tolist() == [2, 0]
    probs = probabilities(logits, 1.0, top_p=0.5)
    assert probs[0].tolist() == [0.0, 0.0, 1.0]


def test_token_logprobs():
    logits = torch.randn(3, 10)
    tokens = torch.tensor([1, 5, 9])
    expected = torch.log_softmax(logits, -1)[torch.arange(3), tokens]
    torch.testing.assert_close(token_logprobs(logits, tokens), expected)


@settings(max_examples=25, deadline=None)
@given(rows=st.integers(1, 4), vocab=st.integers(2, 40), data=st.data())
def test_top_k_top_p_property_vs_transformers(rows, vocab, data):
    logits = torch.tensor(data.draw(st.lists(
        st.lists(st.floats(-5, 5, width=32), min_size=vocab, max_size=vocab),
        min_size=rows, max_size=rows)))
    ks = data.draw(st.lists(st.integers(0, vocab + 2), min_size=rows, max_size=rows))
    ps = data.draw(st.lists(st.floats(0.05, 1.0), min_size=rows, max_size=rows))
    ours = top_p_filter(top_k_filter(logits, torch.tensor(ks)), torch.tensor(ps))
    for row in range(rows):
        x = logits[row:row + 1]
        if 0 < ks[row] < vocab:
            x = TopKLogitsWarper(ks[row])(None, x)
        if ps[row] < 1:
            x = TopPLogitsWarper(ps[row])(None, x)
        assert torch.equal(ours[row:row + 1].isinf(), x.isinf())
        assert not ours[row].isinf().all()


# ---- penalties, min_p (issue 16) ------------------------------------------------------------------

def test_repetition_penalty_matches_transformers():
    from transformers.generation.logits_process import RepetitionPenaltyLogitsProcessor

    from lorafleet.models.sampling import apply_repetition_penalty, padded_ids

    torch.manual_seed(1)
    logits = torch.randn(4, 40) * 4
    ids = [[1, 5, 5, 30], [0, 39, 2], [7], []]
    penalties = [1.3, 0.7, 2.0, 3.0]
    padded, valid = padded_ids(ids, "cpu")
    ours = apply_repetition_penalty(logits.clone(), padded, valid, torch.tensor(penalties))
    assert torch.equal(ours[3], logits[3])          # nothing seen: nothing changes
    for row, (row_ids, p) in enumerate(zip(ids[:3], penalties)):
        expected = RepetitionPenaltyLogitsProcessor(p)(torch.tensor([row_ids]),
                                                       logits[row:row + 1].clone())
        torch.testing.assert_close(ours[row:row + 1], expected)


def test_min_p_matches_transformers_after_temperature_top_k_top_p():
    from transformers.generation.logits_process import MinPLogitsWarper

    from lorafleet.models.sampling import min_p_filter

    torch.manual_seed(2)
    logits = torch.randn(4, 60) * 3
    min_ps = [0.0, 0.05, 0.3, 1.0]
    ours = min_p_filter(logits, torch.tensor(min_ps))
    for row, m in enumerate(min_ps):
        expected = logits[row:row + 1].clone()
        if m > 0:
            expected = MinPLogitsWarper(m)(None, expected)
        assert torch.equal(ours[row:row + 1].isinf(), expected.isinf()), row
    # the whole chain against transformers' warpers in transformers' order
    t, k, p, m = 0.8, 20, 0.9, 0.1
    x = TemperatureLogitsWarper(t)(None, logits.clone())
    x = TopPLogitsWarper(p)(None, TopKLogitsWarper(k)(None, x))
    x = MinPLogitsWarper(m)(None, x)
    torch.testing.assert_close(probabilities(logits, t, k, p, m), x.softmax(-1))
    # min_p = 1 keeps only the most likely token: sampling is then greedy
    assert torch.equal(sample(logits, 1.0, min_p=1.0), logits.argmax(-1))


def test_frequency_presence_penalties_match_the_openai_formula():
    from lorafleet.models.sampling import apply_frequency_presence, padded_ids

    torch.manual_seed(3)
    logits = torch.randn(3, 12)
    outputs = [[3, 3, 3, 7], [11], []]
    freq, pres = [0.5, -1.0, 2.0], [1.5, 0.25, 2.0]
    ours = apply_frequency_presence(logits.clone(), *padded_ids(outputs, "cpu"),
                                    torch.tensor(freq), torch.tensor(pres))
    for row in range(3):       # OpenAI's documented formula, token by token
        for token in range(12):
            count = outputs[row].count(token)
            expected = logits[row, token] - count * freq[row] - (count > 0) * pres[row]
            assert abs(float(ours[row, token]) - float(expected)) < 1e-6


def test_sampling_params_check_the_new_fields():
    import pytest

    from lorafleet.errors import SamplingError
    from lorafleet.models.sampling import SamplingParams

    for bad in [dict(presence_penalty=3), dict(frequency_penalty=True),
                dict(repetition_penalty=0), dict(min_p=1.5), dict(logit_bias={1: 200}),
                dict(logit_bias={"a": 1}), dict(stop_token_ids=[-1]),
                dict(min_tokens=20, max_tokens=10), dict(prompt_logprobs=21),
                dict(json_object=1)]:
        with pytest.raises(SamplingError, match=next(iter(bad)).split("_")[0]):
            SamplingParams(**bad)
    params = SamplingParams(max_tokens=8, min_tokens=8, logit_bias={3: -100.0},
                            stop_token_ids=(4,), prompt_logprobs=0)
    assert params.stop_token_ids == [4] and not params.has_penalties
    assert SamplingParams(repetition_penalty=1.1).has_penalties
