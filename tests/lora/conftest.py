"""Helpers shared by the LoRA and adapter tests: HF base models and PEFT oracles."""
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))

from .lora_helpers import hf_model, ids_for, peft_random  # noqa: E402,F401


@pytest.fixture
def ids():
    return ids_for()
