"""The JSON recognizer behind response_format json_object (serve/json_grammar.py), against
Python's json module: every text it accepts as complete parses, every prefix it accepts closes
into text that parses, and texts json refuses are refused."""
from __future__ import annotations

import json
import random

from lorafleet.serve.json_grammar import START, closing, feed, step

VALID = ['{"a": [1, -2.5e+3, 0.0, true, false, null, {"b": "x\\u00e9\\n"}], "c": {}}', '{}',
         ' {\n"k" : [ ] } ', '{"": ""}', '{"x": [[], [{}]], "y": -0}', '{"e": 1E5}']
INVALID = ['[1]', '"s"', '1', '{"a" 1}', '{,}', '{"a":01}', '{"a":tru}', '{"a":1,}',
           '{"a":[1,]}', '{a:1}', '{"a":1}}', '{"a":"\x01"}', '{"a":"\\x"}', '{"a":1.}',
           '{"a":-}', '{"a":.5}', '{"a":1e}', '{"a":"\\u12G4"}', '{} {}']


def test_accepts_what_json_parses_and_refuses_the_rest():
    for text in VALID:
        state = feed(START, text)
        assert state is not None and state[0] == "done", text
        assert isinstance(json.loads(text), dict)
    for text in INVALID:
        state = feed(START, text)
        assert state is None or state[0] != "done", text


def test_every_accepted_prefix_closes_into_json():
    rng = random.Random(0)
    alphabet = list('{}[]":,0123456789-.eE+ \n\tfalsetrunul\\xu')
    for _ in range(5000):
        state, text = START, ""
        for _ in range(rng.randint(0, 40)):
            ch = rng.choice(alphabet)
            nxt = step(state, ch)
            if nxt is not None:
                state, text = nxt, text + ch
        full = text + closing(state)
        assert isinstance(json.loads(full), dict), full
        assert feed(START, full)[0] == "done"
