"""Model families we own (Llama/Mistral/Qwen2 and GPT-2), loaded from Hugging Face folders."""
from .batch import AttentionBackend, ForwardBatch, project
from .config import ModelConfig
from .generate import Generation, decode_one_token, generate, prefill
from .gpt2 import GPT2, Conv1D
from .kv_cache import KVCache
from .llama import Llama
from .dtype import parse_dtype
from .loader import build_model, checkpoint_tensors, load_model
from .modules import linear_layer_names
from .sampling import SamplingParams
from .tokenizer import Tokenizer, load_tokenizer

__all__ = [
    "AttentionBackend", "ForwardBatch", "project", "ModelConfig", "Generation", "SamplingParams",
    "decode_one_token", "generate", "prefill", "GPT2", "Conv1D", "KVCache", "Llama",
    "build_model", "checkpoint_tensors", "linear_layer_names", "load_model", "parse_dtype",
    "Tokenizer", "load_tokenizer",
]
