import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parents[1] / "lora"))

from lora_helpers import ids_for  # noqa: E402


@pytest.fixture
def ids():
    return ids_for()
