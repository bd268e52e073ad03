"""STYLE.md rule 1: models -> lora -> quant -> train -> adapters -> serve -> api -> cli. The
train stage imports nothing to its right (it reaches PEFT folders through `lorafleet.save_adapter`
/ `load_adapter`, the public API)."""
import ast
from pathlib import Path

TRAIN = Path(__file__).parents[2] / "src" / "lorafleet" / "train"
RIGHT_OF_TRAIN = ("lorafleet.adapters", "lorafleet.serve", "lorafleet.api", "lorafleet.cli",
                  "lorafleet.bench", "lorafleet.demo")


def imported_modules(path: Path):
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            yield from (alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            yield node.module
            yield from (f"{node.module}.{alias.name}" for alias in node.names)


def test_train_imports_only_stages_to_its_left():
    files = sorted(TRAIN.glob("*.py"))
    assert len(files) >= 5
    wrong = [(f.name, m) for f in files for m in imported_modules(f)
             if m.startswith(RIGHT_OF_TRAIN)]
    assert not wrong, wrong
