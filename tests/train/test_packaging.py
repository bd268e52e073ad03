"""Packaging: no exact torch pin in pyproject (constraints.txt keeps it for make), extras by use,
and a job missing an optional package names the extra to install."""
import builtins
import re
import tomllib
from pathlib import Path

from lorafleet.cli import EXTRAS, main

ROOT = Path(__file__).resolve().parents[2]


def test_torch_is_pinned_only_by_constraints():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    torch_req = [d for d in project["dependencies"] if re.match(r"torch\b", d)]
    assert torch_req and "==" not in torch_req[0]
    assert "torch==2.13.0" in (ROOT / "constraints.txt").read_text().splitlines()
    assert "-c constraints.txt" in (ROOT / "Makefile").read_text()


def test_every_extra_named_by_the_cli_installs_that_package():
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"][
        "optional-dependencies"]
    assert {"bench", "plots", "cuda", "track", "data", "test"} <= set(extras)
    for package, extra in EXTRAS.items():
        names = [re.split(r"[\[<>=;! ]", d)[0].lower() for d in extras[extra]]
        assert package in names, (package, extra)
    # `make test` installs what the tests need: the test extra pulls the others in
    (own,) = [d for d in extras["test"] if d.startswith("lorafleet[")]
    pulled = set(own.removeprefix("lorafleet[").rstrip("]").split(","))
    assert pulled == {"bench", "plots", "cuda", "data", "track"}   # track: --report-to tests
    # every package an extra names is pinned for `make` (constraints.txt)
    pinned = {line.split("==")[0].lower().replace("_", "-")
              for line in (ROOT / "constraints.txt").read_text().splitlines() if "==" in line}
    for extra in pulled:
        for dep in extras[extra]:
            name = re.split(r"[\[<>=;! ]", dep)[0].lower().replace("_", "-")
            assert name in pinned, (extra, name)


def test_missing_optional_package_names_the_extra(monkeypatch, capsys):
    real = builtins.__import__

    def without_transformers(name, *args, **kwargs):
        if name.split(".")[0] == "transformers":
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
        return real(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", without_transformers)
    assert main(["bench", "model"]) == 1
    assert "pip install 'lorafleet[bench]'" in capsys.readouterr().err
