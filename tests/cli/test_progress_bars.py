"""Progress bars where the CLI loads things: `serve`'s adapters (--adapter / --lora-modules, read
whole, and an --adapter-dir registered folder by folder) and `bench` (its model loads and runs).
Bars go to stderr on a terminal only and never with --no-progress; the library only calls
`progress(done, total)` (STYLE.md rule 8)."""
import io
import sys

import pytest

from lorafleet.cli import build_parser, main
from lorafleet.cli.progress import ProgressBar, count_through

from ..api.conftest import make_adapters


class _Terminal(io.StringIO):
    def isatty(self):
        return True


@pytest.fixture(scope="module")
def adapter_folders(tmp_path_factory, llama_dir):
    loose = make_adapters(llama_dir, tmp_path_factory.mktemp("loose"), ["one", "two"])
    store = tmp_path_factory.mktemp("store")
    make_adapters(llama_dir, store, ["s1", "s2", "s3"])
    return loose, store


def _serve(llama_dir, adapter_folders, *flags):
    from lorafleet.cli.serve import build

    loose, store = adapter_folders
    args = build_parser().parse_args(
        ["serve", "--model", str(llama_dir), "--num-pages", "256", "--dtype", "float32",
         "--adapter", f"one={loose['one']}", "--lora-modules", f"two={loose['two']}",
         "--adapter-dir", str(store), *flags])
    return build(args)[0]


def test_serve_draws_adapter_bars_on_a_terminal(llama_dir, adapter_folders, monkeypatch):
    terminal = _Terminal()
    monkeypatch.setattr(sys, "stderr", terminal)
    engine = _serve(llama_dir, adapter_folders)
    assert {"one", "two", "s1", "s2", "s3"} <= set(engine.adapters())
    drawn = terminal.getvalue()
    assert "adapters:" in drawn and "0/2" in drawn           # --adapter + --lora-modules
    assert "adapter dir:" in drawn and "0/3" in drawn        # the store's three folders
    assert "?adapter/s" in drawn


@pytest.mark.parametrize("terminal, flags", [(False, []), (True, ["--no-progress"])])
def test_serve_draws_no_bar_off_a_terminal_or_when_asked(llama_dir, adapter_folders,
                                                          monkeypatch, terminal, flags):
    stream = _Terminal() if terminal else io.StringIO()
    monkeypatch.setattr(sys, "stderr", stream)
    engine = _serve(llama_dir, adapter_folders, *flags)
    assert {"one", "two", "s1", "s2", "s3"} <= set(engine.adapters())
    assert "adapter/s" not in stream.getvalue() and "0/2" not in stream.getvalue()


def test_count_through_reports_each_item_and_nothing_for_none():
    calls = []
    assert list(count_through(lambda done, total: calls.append((done, total)), "abc")) == \
        ["a", "b", "c"]
    assert calls == [(0, 3), (1, 3), (2, 3), (3, 3)]
    empty = _Terminal()
    bar = ProgressBar("adapters", stream=empty)
    assert list(count_through(bar, [])) == [] and empty.getvalue() == ""   # no bar flashes by


BENCH_MODEL = ["bench", "model", "--hidden", "32", "--layers", "1", "--heads", "2", "--kv-heads", "2", "--vocab",
               "64", "--batch", "1", "--prompt", "4", "--new", "2", "--repeats", "1"]


@pytest.mark.parametrize("terminal, flags, drawn", [(True, [], True), (True, ["--no-progress"],
                                                                         False),
                                                    (False, [], False)])
def test_bench_model_load_bar(monkeypatch, capsys, terminal, flags, drawn):
    transformers = pytest.importorskip("transformers")
    hf_bars = transformers.utils.logging.is_progress_bar_enabled()
    monkeypatch.delenv("HF_HUB_DISABLE_PROGRESS_BARS", raising=False)   # restored after
    stream = _Terminal() if terminal else io.StringIO()
    monkeypatch.setattr(sys, "stderr", stream)
    try:
        assert main(BENCH_MODEL + flags) == 0
    finally:
        if hf_bars:
            transformers.utils.logging.enable_progress_bar()
    assert "prefill" in capsys.readouterr().out                     # the table, on stdout
    assert ("loading:" in stream.getvalue() and "?tensor/s" in stream.getvalue()) == drawn
    if not drawn:       # nor transformers' own bars (saving the random checkpoint, loading it)
        assert "Writing model shards" not in stream.getvalue()
        assert "it/s" not in stream.getvalue()


def test_bench_progress_is_the_clis():
    """Run as `python -m lorafleet.bench.NAME` (no CLI), a benchmark gets no bar callback."""
    import argparse

    from lorafleet.bench import progress_for

    assert progress_for(argparse.Namespace(), "loading") is None
    seen = []
    args = argparse.Namespace(progress=lambda description, unit: seen.append((description, unit))
                              or "bar")
    assert progress_for(args, "bench serve", "run") == "bar" and seen == [("bench serve", "run")]


@pytest.mark.parametrize("terminal, flags, drawn", [(True, [], True), (True, ["--no-progress"],
                                                                         False),
                                                    (False, [], False)])
def test_train_draws_loading_and_step_bars_on_a_terminal_only(tmp_path, llama_dir, monkeypatch,
                                                              capsys, terminal, flags, drawn):
    import json
    data = tmp_path / "d.jsonl"
    data.write_text("\n".join(json.dumps({"prompt": f"q{i} ", "completion": f"a{i}"})
                              for i in range(4)))
    stream = _Terminal() if terminal else io.StringIO()
    monkeypatch.setattr(sys, "stderr", stream)
    assert main(["train", "--model", str(llama_dir), "--data", str(data), "--out",
                 str(tmp_path / "run"), "--steps", "2", *flags]) == 0
    assert "done: 2 steps" in capsys.readouterr().out
    drawn_text = stream.getvalue()
    assert ("loading:" in drawn_text and "?tensor/s" in drawn_text) == drawn   # the base
    assert ("/2 [" in drawn_text and "step" in drawn_text) == drawn             # the steps
