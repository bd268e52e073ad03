import json
from pathlib import Path

import pytest
import torch

from lorafleet.models import load_model, load_tokenizer
from lorafleet.train import load_trained, train

WORDS = ["one", "two", "three", "fox", "dog", "the", "quick", "lazy", "name", "food"]


def get_tokenizer(path):
    return load_tokenizer(path)


def assert_lowers_loss_and_reloads(cfg, model_dir):
    """Train `cfg` on the model folder: the last three steps' mean loss is under 0.7x the first
    step's, and the saved artifact rebuilds the same model on a fresh base. Returns the result."""
    result = train(cfg, tokenizer=get_tokenizer(model_dir))
    losses = [e["loss"] for e in result.history if e["type"] == "step"]
    assert sum(losses[-3:]) / 3 < 0.7 * losses[0], losses
    ids = torch.randint(2, 300, (2, 12))
    with torch.no_grad():
        expected = result.model.eval()(ids)
        reloaded = load_trained(load_model(model_dir), result.artifact)(ids)
    torch.testing.assert_close(reloaded, getattr(expected, "logits", expected),
                               rtol=1e-5, atol=1e-5)
    return result


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
