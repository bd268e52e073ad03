"""lm-evaluation-harness's `local-completions` model against the server, offline: a
multiple-choice (loglikelihood) task and a generate-until task from small local JSON files.
lm-eval tokenizes through the server (/tokenizer_info, /tokenize: its remote tokenizer), asks
for echoed prompt logprobs, and scores; each loglikelihood it reports is checked against
transformers' log-softmax of the same tokens, its accuracy against the choices that oracle
ranks first, and each generation against the transformers greedy continuation."""
from __future__ import annotations

import json

import pytest

from .conftest import ServerThread, build_engine

pytestmark = pytest.mark.slow

DOCS = [
    {"question": "The capital of France is", "choices": ["Paris", "Berlin", "a tree"],
     "answer": 0},
    {"question": "Two plus two equals", "choices": ["four", "five"], "answer": 0},
    {"question": "Snow is usually", "choices": ["green", "white", "loud"], "answer": 1},
]


@pytest.fixture(scope="module")
def open_server(llama_dir, tokenizer):
    from lorafleet.api.server import ServerConfig, create_app

    app = create_app(build_engine(llama_dir, tokenizer, {}), tokenizer,
                     ServerConfig(model_name="base", max_model_len=256))
    thread = ServerThread(app).start()
    yield thread
    thread.stop()


def _tasks(root):
    data = root / "docs.jsonl"
    data.write_text("".join(json.dumps(d) + "\n" for d in DOCS))
    common = {"dataset_path": "json", "dataset_kwargs": {"data_files": {"test": str(data)}},
              "test_split": "test", "doc_to_text": "{{question}}"}
    (root / "mc.yaml").write_text(json.dumps({
        **common, "task": "lorafleet_mc", "output_type": "multiple_choice",
        "doc_to_choice": "{{choices}}", "doc_to_target": "{{answer}}",
        "metric_list": [{"metric": "acc"}]}))
    (root / "gen.yaml").write_text(json.dumps({
        **common, "task": "lorafleet_gen", "output_type": "generate_until",
        "doc_to_target": "{{choices[answer]}}",
        "generation_kwargs": {"until": ["\n\n"], "max_gen_toks": 6, "do_sample": False},
        "metric_list": [{"metric": "exact_match"}]}))


def test_lm_eval_local_completions_offline(open_server, tokenizer, reference, tmp_path,
                                           monkeypatch):
    for var in ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        monkeypatch.setenv(var, "1")
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "hf-datasets"))
    monkeypatch.setenv("OPENAI_API_KEY", "unused")
    reason = "lm-eval[api] is in the `test` extra (pip install -e .[test])"
    lm_eval = pytest.importorskip("lm_eval", reason=reason)
    for module in ("tenacity", "aiohttp"):      # what its API models need ([api])
        pytest.importorskip(module, reason=reason)
    from lm_eval.tasks import TaskManager

    _tasks(tmp_path)
    results = lm_eval.simple_evaluate(
        model="local-completions",
        model_args={"model": "base", "base_url": open_server.url + "/v1/completions",
                    "num_concurrent": 1, "max_retries": 1, "tokenized_requests": True},
        tasks=["lorafleet_mc", "lorafleet_gen"],
        task_manager=TaskManager(include_path=str(tmp_path)), log_samples=True,
        batch_size=2)

    def encode(text):
        return tokenizer.encode(text, add_special_tokens=False)

    correct = 0
    samples = sorted(results["samples"]["lorafleet_mc"], key=lambda s: s["doc_id"])
    assert len(samples) == len(DOCS)
    for sample, doc in zip(samples, DOCS):
        scores = []
        for choice, resp in zip(doc["choices"], sample["resps"]):
            context, continuation = doc["question"], " " + choice   # target_delimiter " "
            whole, ctx = encode(context + continuation), encode(context)
            logprobs = reference.log_softmax(whole, None)
            expected = sum(float(logprobs[t - 1, whole[t]]) for t in range(len(ctx), len(whole)))
            assert abs(resp[0][0] - expected) < 1e-3, (choice, resp, expected)
            scores.append(expected)
        correct += max(range(len(scores)), key=scores.__getitem__) == doc["answer"]
    assert results["results"]["lorafleet_mc"]["acc,none"] == pytest.approx(correct / len(DOCS))

    generations = sorted(results["samples"]["lorafleet_gen"], key=lambda s: s["doc_id"])
    for sample, doc in zip(generations, DOCS):
        ids = encode(doc["question"])
        expected = tokenizer.decode(reference(ids, None, 6)).split("\n\n")[0]
        assert sample["resps"][0][0] == expected
    assert "exact_match,none" in results["results"]["lorafleet_gen"]
