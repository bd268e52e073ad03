import json

import pytest
import sacrebleu

from lorafleet.demo import tasks
from lorafleet.errors import DataError


@pytest.mark.parametrize("name", sorted(tasks.TASKS))
def test_splits_are_deterministic_and_disjoint(name):
    train = tasks.make_split(name, "train", 200, seed=3)
    assert train == tasks.make_split(name, "train", 200, seed=3)
    assert train != tasks.make_split(name, "train", 200, seed=4)
    test = tasks.make_split(name, "test", 50, seed=3)
    assert len({e.prompt for e in train}) == 200
    # disjoint from a train split of any size up to the 1000 prompts the filter checks
    big_train = {e.prompt for e in tasks.make_split(name, "train", 1000, seed=3)}
    assert not big_train & {e.prompt for e in test}
    for e in train[:20]:
        assert e.completion.startswith(" ") and e.completion.strip() in e.references


def test_task_outputs_are_what_they_claim():
    import random
    rng = random.Random(0)
    for _ in range(50):
        e = tasks.json_example(rng)
        obj = json.loads(e.completion)
        assert obj["name"] in e.prompt and obj["city"] in e.prompt and str(obj["age"]) in e.prompt
        r = tasks.reverse_example(rng)
        words = r.prompt.split("\n")[0].removeprefix("Reverse: ").split()
        assert r.completion.split() == words[::-1]
        d = tasks.e2e_example(rng)
        assert d.prompt.startswith("Describe: name[") and len(d.references) == 4


def test_e2e_references_render_every_field():
    mr = {"name": "The Eagle", "eatType": "coffee shop", "food": "French",
          "priceRange": "cheap", "area": "riverside", "familyFriendly": "yes"}
    first = tasks.e2e_references(mr)[0]
    assert first == ("The Eagle is a cheap coffee shop serving French food by the riverside. "
                     "It is family friendly.")


def test_exact_match_hand_computed():
    assert tasks.exact_match([" a b\nextra", "x", "c"], ["a b", "y", "c"]) == pytest.approx(200 / 3)
    assert tasks.exact_match([], []) == 0.0
    with pytest.raises(DataError, match="2 predictions for 1"):
        tasks.exact_match(["a", "b"], ["a"])


def test_bleu_matches_sacrebleu_and_uses_all_references():
    preds = ["the cat sat on the mat", "a dog ran in the park today"]
    refs = [("the cat sat on the mat", "a cat was on the mat"), ("a dog ran in the park",)]
    expected = sacrebleu.corpus_bleu(
        preds, [["the cat sat on the mat", "a dog ran in the park"],
                ["a cat was on the mat", "a dog ran in the park"]]).score
    assert tasks.bleu(preds, refs) == pytest.approx(expected)
    # a perfect match to the second reference scores 100
    assert tasks.bleu(["a cat was on the mat"], [("zzz yyy xxx www", "a cat was on the mat")]) \
        == pytest.approx(100.0)


def test_score_dispatches_on_metric():
    test = tasks.make_split("json", "test", 4)
    assert tasks.score("json", [e.completion for e in test], test) == 100.0
    assert tasks.score("json", ["nonsense"] * 4, test) == 0.0
    e2e = tasks.make_split("e2e", "test", 4)
    assert tasks.score("e2e", [e.references[2] for e in e2e], e2e) == pytest.approx(100.0)


def test_bad_names_raise():
    with pytest.raises(DataError, match="unknown task 'nope'"):
        tasks.make_split("nope", "train", 1)
    with pytest.raises(DataError, match="unknown split 'dev'"):
        tasks.make_split("json", "dev", 1)


def test_write_jsonl(tmp_path):
    examples = tasks.make_split("reverse", "train", 3)
    path = tasks.write_jsonl(tmp_path / "a" / "train.jsonl", examples)
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    assert rows == [{"prompt": e.prompt, "completion": e.completion} for e in examples]


def test_partial_match_hand_computed():
    ref = '{"name": "Alice", "age": 30, "city": "Paris"}'
    assert tasks.partial_match(' {"name": "Alice", "age": 31, "city": "Paris"}', ref) == \
        pytest.approx(200 / 3)
    assert tasks.partial_match("not json", ref) == 0.0
    assert tasks.partial_match(" A B C\nmore", "A X C") == pytest.approx(200 / 3)
    assert tasks.partial_match("A B C D", "A B") == pytest.approx(50.0)  # extra words cost
    examples = tasks.make_split("upper", "test", 2)
    assert tasks.partial_score("upper", [e.completion for e in examples], examples) == 100.0


def test_upper_task():
    import random
    e = tasks.upper_example(random.Random(0))
    words = e.prompt.split("\n")[0].removeprefix("Uppercase: ").split()
    assert e.completion.split() == [w.upper() for w in words]
