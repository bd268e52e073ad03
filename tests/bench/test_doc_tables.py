"""Every result table in docs/benchmarks.md and docs/paper.md is generated (issue 18 item 6).

1. Each generated block (`<!-- bench NAME: begin -->` ... `end -->`, and the serve report's
   markers) is re-rendered from its committed JSON by the very command the doc shows (`lorafleet
   bench NAME --from-json ... --update-doc COPY`, on a copy of the doc) and the copy must come
   out byte-identical: a doc edited by hand, or a JSON changed without regenerating the doc,
   fails here.
2. Every markdown table in those docs lies inside a generated block, or is on a short
   allow-list with the reason it is not a measured result.
"""
from __future__ import annotations

import re
import shutil
from pathlib import Path

import pytest

from lorafleet.cli import main

ROOT = Path(__file__).resolve().parents[2]
DOCS = ("docs/benchmarks.md", "docs/paper.md")

# (doc, block name) -> the re-render command's arguments; "{doc}" is the copy to rewrite and
# "{tmp}" a scratch folder (figures some commands redraw). Paths are relative to the repository
# root, as the docs show them, since the rendered text names its sources.
RERENDER = {
    ("docs/benchmarks.md", "roofline"): [
        "bench", "roofline", "--from-json", "docs/results/roofline.json", "--update-doc", "{doc}"],
    ("docs/benchmarks.md", "model"): [
        "bench", "model", "--from-json", "docs/results/model.json", "--update-doc", "{doc}"],
    ("docs/benchmarks.md", "train"): [
        "bench", "train", "--from-json", "docs/results/train_step_551m.json",
        "docs/results/train_versus_peft_120m.json", "--update-doc", "{doc}"],
    ("docs/benchmarks.md", "quant"): [
        "bench", "quant", "--from-json", "docs/results/quant.json", "--update-doc", "{doc}"],
    ("docs/benchmarks.md", "serve-report"): [
        "bench", "serve", "--report", "docs/results/serve-20261202-0314.json",
        "docs/results/serve-20261202-0358-repeats.json", "--update-doc", "{doc}"],
    ("docs/benchmarks.md", "kernels"): [
        "bench", "kernels", "--from-json", "docs/results/kernels.json", "--update-doc", "{doc}"],
    ("docs/benchmarks.md", "serve_tp"): [
        "bench", "serve_tp", "--from-json", "docs/results/serve-tp-vocab.json",
        "docs/results/serve-tp.json", "--update-doc", "{doc}"],
    ("docs/paper.md", "pretraining"): [
        "bench", "pretraining", "--from-json",
        "src/lorafleet/assets/base-model/pretrain_log.json", "--update-doc", "{doc}"],
    ("docs/paper.md", "inits"): [
        "bench", "inits", "--from-json", "docs/results/inits.json",
        "docs/results/inits_lr3e-3.json", "--paper", "{doc}"],
    ("docs/paper.md", "dtypes"): [
        "bench", "dtypes", "--from-json", "docs/results/dtypes.json", "--paper", "{doc}"],
    ("docs/paper.md", "methods"): [
        "bench", "methods", "--from-json", "docs/results/methods.json", "--paper", "{doc}"],
    ("docs/paper.md", "efficiency"): [
        "bench", "efficiency", "--from-json", "docs/results/efficiency.json", "--paper", "{doc}",
        "--figure", "{tmp}/figures/efficiency_latency.png"],
}

# Blocks not yet generated from a committed JSON: checked for being blocks (test 2), not for
# matching their JSON. Each says what is missing; remove the entry when it is done.
PENDING: dict[tuple[str, str], str] = {}

# Tables outside any block, each with the reason it is not (yet) a generated result.
ALLOWED: dict[tuple[str, str], str] = {}

BLOCK = re.compile(r"^<!-- (?:bench ([\w-]+): begin|(serve-report):begin) -->$", re.M)


def _end_marker(name: str) -> str:
    return "<!-- serve-report:end -->" if name == "serve-report" else f"<!-- bench {name}: end -->"


def blocks(text: str) -> list[tuple[str, int, int]]:
    """(name, first line, last line) of every generated block, lines 0-based, markers included."""
    lines = text.splitlines()
    found = []
    for match in BLOCK.finditer(text):
        name = match.group(1) or match.group(2)
        first = text.count("\n", 0, match.start())
        last = next((i for i in range(first + 1, len(lines)) if lines[i] == _end_marker(name)),
                    None)
        assert last is not None, f"block {name!r} at line {first + 1} has no end marker"
        found.append((name, first, last))
    return found


def tables(text: str) -> list[tuple[int, str]]:
    """(first line, header line) of every markdown table outside code fences."""
    found, in_fence, previous = [], False, False
    for i, line in enumerate(text.splitlines()):
        if line.lstrip().startswith("```"):
            in_fence = not in_fence
        is_row = not in_fence and line.startswith("|")
        if is_row and not previous:
            found.append((i, line.strip()))
        previous = is_row
    return found


def _all_blocks():
    return [(doc, name) for doc in DOCS
            for name, _, _ in blocks((ROOT / doc).read_text())]


def test_the_parsers_find_blocks_and_tables():
    text = ("intro\n| a | b |\n|---|---|\n| 1 | 2 |\n\n```\n| not | a table |\n```\n"
            "<!-- bench x: begin -->\n| c |\n|---|\n<!-- bench x: end -->\n"
            "<!-- serve-report:begin -->\n<!-- serve-report:end -->\n")
    assert tables(text) == [(1, "| a | b |"), (9, "| c |")]
    assert blocks(text) == [("x", 8, 11), ("serve-report", 12, 13)]


def test_every_block_has_a_rerender_command():
    unknown = [key for key in _all_blocks() if key not in RERENDER and key not in PENDING]
    assert not unknown, (f"generated blocks with no re-render command in {__file__} "
                         f"(add it to RERENDER): {unknown}")


@pytest.mark.parametrize("doc,name", [key for key in RERENDER])
def test_block_equals_its_json_rendering(doc, name, tmp_path, monkeypatch, capsys):
    text = (ROOT / doc).read_text()
    if name not in {n for n, _, _ in blocks(text)}:
        pytest.skip(f"{doc} has no `{name}` block (yet)")
    if (doc, name) in PENDING:
        pytest.skip(PENDING[doc, name])
    copy = tmp_path / Path(doc).name
    shutil.copy(ROOT / doc, copy)
    monkeypatch.chdir(ROOT)
    argv = [a.format(doc=copy, tmp=tmp_path) for a in RERENDER[doc, name]]
    assert main(argv) == 0
    capsys.readouterr()
    rendered = copy.read_text()
    if rendered != text:
        want = {n: (f, la) for n, f, la in blocks(text)}[name]
        got = {n: (f, la) for n, f, la in blocks(rendered)}[name]
        old = text.splitlines()[want[0]:want[1] + 1]
        new = rendered.splitlines()[got[0]:got[1] + 1]
        diff = next((i for i, (a, b) in enumerate(zip(old, new)) if a != b),
                    min(len(old), len(new)))
        pytest.fail(f"{doc} block `{name}` differs from `lorafleet {' '.join(argv)}` at block "
                    f"line {diff}:\n  doc:      {old[diff] if diff < len(old) else '(end)'}\n"
                    f"  rendered: {new[diff] if diff < len(new) else '(end)'}")


@pytest.mark.parametrize("doc", DOCS)
def test_every_table_is_generated_or_allowed(doc):
    text = (ROOT / doc).read_text()
    spans = [(first, last) for _, first, last in blocks(text)]
    stray = [(line + 1, header) for line, header in tables(text)
             if not any(first < line < last for first, last in spans)
             and (doc, header) not in ALLOWED]
    assert not stray, (f"{doc}: tables outside any generated block (make their bench write "
                       f"JSON and the block, or allow-list them with a reason): {stray}")


def test_allow_list_and_pending_entries_are_live():
    """An entry whose table or block is gone must go too, so the lists stay short and true."""
    for (doc, header), reason in ALLOWED.items():
        assert reason and header in {h for _, h in tables((ROOT / doc).read_text())}, header
    for key, reason in PENDING.items():
        assert reason and key in _all_blocks(), key
