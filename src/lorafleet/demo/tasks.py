"""Three small tasks with clearly different outputs, generated deterministically from a seed.

- `e2e`: restaurant data-to-text in the style of the E2E NLG challenge the LoRA paper used
  (sec. 5.4): a meaning representation `name[The Eagle], eatType[pub], ...` -> one sentence.
  Several templates render each MR, and all of them are references for BLEU (E2E has ~8
  human references per MR).
- `json`: a sentence about a person -> `{"name": ..., "age": ..., "city": ...}`.
- `reverse`: a list of words -> the same words in reverse order.

Each task has a train and a held-out test split; no test prompt appears in the train split.
Records are prompt/completion pairs (the JSONL shape lorafleet.train reads).
"""
from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from lorafleet.errors import DataError

SPLIT_SEEDS = {"train": 0, "test": 1}  # added to the caller's seed; disjointness is enforced too


@dataclass(frozen=True)
class TaskExample:
    prompt: str
    completion: str           # the target, with the leading space it is trained with
    references: tuple[str, ...]  # every acceptable output (BLEU references for e2e)

    def record(self) -> dict:
        return {"prompt": self.prompt, "completion": self.completion}


# ---------------------------------------------------------------- e2e data-to-text

NAMES = ["The Eagle", "The Mill", "Blue Spice", "The Golden Curry", "Zizzi", "Cotto",
         "Fitzbillies", "The Phoenix", "Aromi", "The Punter", "Giraffe", "Strada",
         "The Vaults", "Wildwood", "Alimentum", "The Cricketers", "Green Man", "Loch Fyne",
         "The Waterman", "Clowns", "The Olive Grove", "Browns Cambridge", "Midsummer House",
         "The Rice Boat", "Taste of Cambridge", "The Dumpling Tree", "Bibimbap House",
         "The Plough", "Travellers Rest Beefeater", "Cocum"]
EAT_TYPES = ["restaurant", "coffee shop", "pub"]
FOODS = ["French", "Italian", "Chinese", "Indian", "English", "Japanese", "Fast food"]
PRICES = ["cheap", "moderate", "high", "less than 20 pounds", "more than 30 pounds"]
AREAS = ["riverside", "city centre"]


def _e2e_sample(rng: random.Random) -> dict:
    mr = {"name": rng.choice(NAMES), "eatType": rng.choice(EAT_TYPES), "food": rng.choice(FOODS)}
    if rng.random() < 0.8:
        mr["priceRange"] = rng.choice(PRICES)
    mr["area"] = rng.choice(AREAS)
    if rng.random() < 0.5:
        mr["familyFriendly"] = rng.choice(["yes", "no"])
    return mr


def _price_phrase(price: str) -> str:
    return {"cheap": "cheap", "moderate": "moderately priced", "high": "expensive",
            "less than 20 pounds": "low-priced", "more than 30 pounds": "high-priced"}[price]


def _family_phrase(mr: dict) -> str:
    if "familyFriendly" not in mr:
        return ""
    return " It is family friendly." if mr["familyFriendly"] == "yes" \
        else " It is not family friendly."


def e2e_references(mr: dict) -> list[str]:
    """Every template's rendering of `mr`; the first is the training target."""
    name, eat, food, area = mr["name"], mr["eatType"], mr["food"], mr["area"]
    food_l = food if food != "Fast food" else "fast food"
    in_area = "by the riverside" if area == "riverside" else "in the city centre"
    price = _price_phrase(mr["priceRange"]) + " " if "priceRange" in mr else ""
    fam = _family_phrase(mr)
    templates = [
        f"{name} is a {price}{eat} serving {food_l} food {in_area}.{fam}",
        f"There is a {price}{eat} called {name} {in_area} that serves {food_l} food.{fam}",
        f"{name} serves {food_l} food. It is a {price}{eat} {in_area}.{fam}",
        f"Located {in_area}, {name} is a {price}{eat} offering {food_l} food.{fam}",
    ]
    return templates


def e2e_example(rng: random.Random) -> TaskExample:
    mr = _e2e_sample(rng)
    refs = e2e_references(mr)
    # The paper's E2E targets are one of several phrasings; we train on a template chosen per
    # example so the adapter learns the task, not one sentence frame.
    target = refs[rng.randrange(len(refs))]
    prompt = "Describe: " + ", ".join(f"{k}[{v}]" for k, v in mr.items()) + "\nSentence:"
    return TaskExample(prompt, " " + target, tuple(refs))


# ---------------------------------------------------------------- text -> JSON

PEOPLE = ["Alice", "Bob", "Carol", "David", "Emma", "Frank", "Grace", "Henry", "Isla", "Jack",
          "Karen", "Liam", "Maria", "Noah", "Olivia", "Peter", "Quinn", "Rosa", "Sam", "Tara",
          "Umar", "Vera", "Will", "Yara", "Zoe"]
CITIES = ["Paris", "London", "Rome", "Berlin", "Madrid", "Vienna", "Dublin", "Oslo", "Lisbon",
          "Prague", "Athens", "Tokyo", "Cairo", "Lima", "Boston"]
PERSON_TEMPLATES = [
    "{name} is {age} and lives in {city}.",
    "{name}, aged {age}, lives in {city}.",
    "Meet {name} from {city}, who is {age} years old.",
    "{name} lives in {city} and is {age} years old.",
]


def json_target(name: str, age: int, city: str) -> str:
    return json.dumps({"name": name, "age": age, "city": city})


def json_example(rng: random.Random) -> TaskExample:
    name, city, age = rng.choice(PEOPLE), rng.choice(CITIES), rng.randint(18, 90)
    text = rng.choice(PERSON_TEMPLATES).format(name=name, age=age, city=city)
    target = json_target(name, age, city)
    return TaskExample(f"To JSON: {text}\nJSON:", " " + target, (target,))


# ---------------------------------------------------------------- reverse a list of words

WORDS = ["apple", "river", "stone", "cloud", "tiger", "bread", "music", "green", "house",
         "light", "night", "ocean", "paper", "queen", "sword", "table", "water", "crown",
         "horse", "flower", "honey", "storm", "field", "glass", "heart", "king", "moon",
         "star", "tree", "wind"]


def reverse_example(rng: random.Random) -> TaskExample:
    words = rng.sample(WORDS, rng.randint(3, 4))
    target = " ".join(reversed(words))
    return TaskExample("Reverse: " + " ".join(words) + "\nReversed:", " " + target, (target,))


def upper_example(rng: random.Random) -> TaskExample:
    """Monotonic copying with a per-word mapping: easier for a 5M model than reversing (which
    needs attention to the word *before* the one just produced), so the default demo uses it."""
    words = rng.sample(WORDS, rng.randint(3, 5))
    target = " ".join(w.upper() for w in words)
    return TaskExample("Uppercase: " + " ".join(words) + "\nUppercased:", " " + target, (target,))


def join_example(rng: random.Random) -> TaskExample:
    """A list of words -> an English list ("a, b and c"): in-order copying, the pattern a small
    model's induction heads already do, plus the punctuation rule."""
    words = rng.sample(WORDS, rng.randint(3, 5))
    target = ", ".join(words[:-1]) + " and " + words[-1]
    return TaskExample("Join: " + " ".join(words) + "\nJoined:", " " + target, (target,))


# ---------------------------------------------------------------- registry, splits, scoring

@dataclass(frozen=True)
class Task:
    name: str
    description: str
    make: Callable[[random.Random], TaskExample]
    metric: str  # "bleu" or "exact_match"


TASKS: dict[str, Task] = {
    "e2e": Task("e2e", "restaurant data-to-text (E2E style)", e2e_example, "bleu"),
    "json": Task("json", "sentence -> JSON object", json_example, "exact_match"),
    "reverse": Task("reverse", "reverse a list of words", reverse_example, "exact_match"),
    "upper": Task("upper", "uppercase a list of words", upper_example, "exact_match"),
    "join": Task("join", "a list of words -> an English list", join_example, "exact_match"),
}


def get_task(name: str) -> Task:
    if name not in TASKS:
        raise DataError(f"unknown task {name!r}; expected one of {sorted(TASKS)}")
    return TASKS[name]


def make_split(task: str, split: str, n: int, seed: int = 0) -> list[TaskExample]:
    """`n` distinct examples of `task`. The test split never repeats a train prompt (of the
    same seed): it is generated from its own stream and filtered against the train prompts."""
    if split not in SPLIT_SEEDS:
        raise DataError(f"unknown split {split!r}; expected one of {sorted(SPLIT_SEEDS)}")
    t = get_task(task)
    exclude: set[str] = set()
    if split == "test":
        exclude = {e.prompt for e in _distinct(t, 1000, seed + SPLIT_SEEDS["train"], set())}
    return _distinct(t, n, seed + SPLIT_SEEDS[split], exclude)[:n]


def _distinct(task: Task, n: int, seed: int, exclude: set[str]) -> list[TaskExample]:
    rng = random.Random(f"{task.name}:{seed}")
    out: list[TaskExample] = []
    seen = set(exclude)
    attempts = 0
    while len(out) < n:
        attempts += 1
        if attempts > 50 * n + 1000:
            raise DataError(f"task {task.name!r} cannot produce {n} distinct examples")
        example = task.make(rng)
        if example.prompt in seen:
            continue
        seen.add(example.prompt)
        out.append(example)
    return out


def write_jsonl(path: str | Path, examples: list[TaskExample]) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as f:
        for example in examples:
            f.write(json.dumps(example.record()) + "\n")
    return path


def clean_output(text: str) -> str:
    """A generated completion up to the end of its first line, without surrounding spaces."""
    return text.split("\n", 1)[0].strip()


def exact_match(predictions: list[str], references: list[str]) -> float:
    """Percentage of predictions equal to their reference after `clean_output`."""
    if len(predictions) != len(references):
        raise DataError(f"{len(predictions)} predictions for {len(references)} references")
    if not predictions:
        return 0.0
    hits = sum(clean_output(p) == r.strip() for p, r in zip(predictions, references))
    return 100.0 * hits / len(predictions)


def bleu(predictions: list[str], references: list[tuple[str, ...]]) -> float:
    """Corpus BLEU (sacrebleu, default 13a tokenization) with several references per example."""
    import sacrebleu

    if len(predictions) != len(references):
        raise DataError(f"{len(predictions)} predictions for {len(references)} references")
    if not predictions:
        return 0.0
    width = max(len(r) for r in references)
    # sacrebleu wants one stream per reference slot; pad short lists by repeating their first.
    streams = [[r[i] if i < len(r) else r[0] for r in references] for i in range(width)]
    return sacrebleu.corpus_bleu([clean_output(p) for p in predictions], streams).score


def _json_fields(text: str) -> dict:
    try:
        value = json.loads(text)
    except json.JSONDecodeError:
        return {}
    return value if isinstance(value, dict) else {}


def partial_match(prediction: str, reference: str) -> float:
    """Partial credit (0-100) for one structured output: the share of the reference's JSON
    fields with the right value, or for a word list the share of positions with the right word."""
    prediction, reference = clean_output(prediction), reference.strip()
    if reference.startswith("{"):
        want, got = _json_fields(reference), _json_fields(prediction)
        return 100.0 * sum(got.get(k) == v for k, v in want.items()) / max(1, len(want))
    want, got = reference.split(), prediction.split()
    return 100.0 * sum(a == b for a, b in zip(want, got)) / max(len(want), len(got), 1)


def partial_score(task: str, predictions: list[str], examples: list[TaskExample]) -> float:
    """Mean partial credit for the structured tasks; the task's own metric for e2e."""
    if get_task(task).metric == "bleu":
        return score(task, predictions, examples)
    if not predictions:
        return 0.0
    return sum(partial_match(p, e.references[0])
               for p, e in zip(predictions, examples)) / len(predictions)


def score(task: str, predictions: list[str], examples: list[TaskExample]) -> float:
    """The task's metric (0-100) of `predictions` against `examples`' references."""
    t = get_task(task)
    if t.metric == "bleu":
        return bleu(predictions, [e.references for e in examples])
    return exact_match(predictions, [e.references[0] for e in examples])
