import json
from pathlib import Path

import pytest

from lorafleet.models import load_tokenizer

WORDS = ["one", "two", "three", "fox", "dog", "the", "quick", "lazy", "name", "food"]


def get_tokenizer(path):
    return load_tokenizer(path)


@pytest.fixture(scope="session")
def tokenizer(llama_dir):
    return get_tokenizer(llama_dir)


def toy_records(n=8):
    """Reverse three words: learnable by memorization in a few dozen steps."""
    records = []
    for i in range(n):
        words = [WORDS[(i + j * 3) % len(WORDS)] for j in range(3)]
        records.append({"prompt": "reverse : " + " ".join(words) + " ->",
                        "completion": " " + " ".join(reversed(words)) + " ."})
    return records


def write_jsonl(path: Path, records) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records))
    return path


@pytest.fixture
def toy_data(tmp_path):
    return write_jsonl(tmp_path / "toy.jsonl", toy_records())


@pytest.fixture(scope="session")
def train_llama_dir(tmp_path_factory):
    """The small Llama with larger random weights (std 0.2, not 0.02): at 0.02 the logits are
    so flat that methods leaving lm_head frozen (adapter, prefix, bitfit) barely move the loss
    in a few steps, which would make 'lowers the loss' a weak test."""
    from hf_fixtures import make_checkpoint
    path = tmp_path_factory.mktemp("train_llama")
    make_checkpoint(path, "llama", initializer_range=0.2)
    return path
