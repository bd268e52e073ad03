"""Stop strings beyond OpenAI's 4 (vLLM has no cap; lm-eval's generate-until sends its own
list): the sixth of six stops the text where it first appears, and streaming agrees; the cap
(MAX_STOP_SEQUENCES) is a 400 that names the field."""
import openai
import pytest

from lorafleet.api.protocol import MAX_STOP_SEQUENCES

PROMPT = "the quick brown fox"


def test_a_stop_string_beyond_the_fourth_stops_the_text(client):
    full = client.completions.create(model="beta", prompt=PROMPT, max_tokens=16,
                                     temperature=0).choices[0].text
    stop = full[len(full) // 2:len(full) // 2 + 2]
    assert stop.strip(), full
    stops = [f"zq{i}#" for i in range(5)] + [stop]          # the real one is sixth
    resp = client.completions.create(model="beta", prompt=PROMPT, max_tokens=16,
                                     temperature=0, stop=stops)
    text = resp.choices[0].text
    assert resp.choices[0].finish_reason == "stop"
    assert text == full[:full.index(stop)]                   # cut where it first appears
    streamed = "".join(chunk.choices[0].text for chunk in client.completions.create(
        model="beta", prompt=PROMPT, max_tokens=16, temperature=0, stop=stops, stream=True))
    assert streamed == text


def test_more_stop_strings_than_the_cap_is_a_400_naming_the_field(client):
    with pytest.raises(openai.BadRequestError, match="stop"):
        client.completions.create(model="beta", prompt=PROMPT, max_tokens=4,
                                  stop=[f"s{i}" for i in range(MAX_STOP_SEQUENCES + 1)])
    resp = client.completions.create(model="beta", prompt=PROMPT, max_tokens=4,
                                     stop=[f"zq{i}#" for i in range(MAX_STOP_SEQUENCES)])
    assert resp.choices[0].finish_reason == "length"
