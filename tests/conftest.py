import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))

from hf_fixtures import make_checkpoint  # noqa: E402

torch.set_num_threads(2)


@pytest.fixture(scope="session", autouse=True)
def _auto_dtype_is_float32():
    """dtype "auto" resolves as on a CPU without bf16 instructions (float32), so every test
    compares against its float32 oracle whatever the machine's CPU flags (session scope: before
    any module-scoped engine is built); a test of the bf16 choice itself patches
    `lorafleet.models.dtype.cpu_has_fast_bf16` again."""
    import lorafleet.models.dtype

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(lorafleet.models.dtype, "cpu_has_fast_bf16", lambda: False)
        yield


@pytest.fixture(scope="session")
def llama_dir(tmp_path_factory):
    """A small random Llama with grouped-query attention, saved with a tokenizer."""
    path = tmp_path_factory.mktemp("llama")
    make_checkpoint(path, "llama")
    return path


@pytest.fixture(scope="session")
def gpt2_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("gpt2")
    make_checkpoint(path, "gpt2")
    return path
