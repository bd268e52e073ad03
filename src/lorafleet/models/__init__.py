"""Model families we own (Llama/Mistral/Qwen2 and GPT-2), loaded from Hugging Face folders."""
from .batch import AttentionBackend, ForwardBatch, project
from .config import ModelConfig
from .gpt2 import GPT2, Conv1D
from .llama import Llama
from .loader import build_model, linear_layer_names, load_model, parse_dtype

__all__ = [
    "AttentionBackend", "ForwardBatch", "project", "ModelConfig", "GPT2", "Conv1D", "Llama",
    "build_model", "linear_layer_names", "load_model", "parse_dtype",
]
from .generate import Generation, SamplingConfig, decode_one_token, generate, prefill  # noqa: E402
from .kv_cache import KVCache  # noqa: E402
from .tokenizer import Tokenizer, load_tokenizer  # noqa: E402

__all__ += ["Generation", "SamplingConfig", "decode_one_token", "generate", "prefill", "KVCache",
            "Tokenizer", "load_tokenizer"]
