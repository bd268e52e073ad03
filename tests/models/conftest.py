import pytest

from hf_fixtures import make_checkpoint

LLAMA3_ROPE = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0,
               "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 32}

# name -> (kind, config overrides, max_shard_size)
CHECKPOINTS = {
    "llama_gqa": ("llama", {}, None),
    "llama3_rope_tied": ("llama", {"rope_parameters": LLAMA3_ROPE, "tie_word_embeddings": True,
                                   "attention_bias": True, "mlp_bias": True}, None),
    "llama_sharded": ("llama", {}, "40KB"),
    "mistral": ("mistral", {}, None),
    "qwen2": ("qwen2", {}, None),
    "gpt2": ("gpt2", {}, None),
}


@pytest.fixture(scope="session")
def checkpoints(tmp_path_factory):
    """name -> (folder, transformers oracle model); built lazily, once per session."""
    built = {}

    def get(name):
        if name not in built:
            kind, overrides, shard = CHECKPOINTS[name]
            path = tmp_path_factory.mktemp(name)
            built[name] = (path, make_checkpoint(path, kind, max_shard_size=shard, **overrides))
        return built[name]
    return get
