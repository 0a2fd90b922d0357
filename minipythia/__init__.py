"""minipythia: Pythia (GPT-NeoX) from scratch in PyTorch, with a native, compressible KV cache."""

from .kv import KVCache
from .compressors import (COMPRESSORS, H2O, TOVA, CapacityBudget, Compressor, KnormPress, NoCompression, Oracle,
                          PyramidKV, RandomEviction, SnapKV, StreamingLLM, attention_weights, build_compressor,
                          import_policies, oracle_future_queries, register)
from .config import MODEL_NAMES, PythiaConfig
from .generate import Generation, generate
from .model import Pythia
from .prefill import Prefill
from .tokenizer import Tokenizer

__all__ = ["COMPRESSORS", "CapacityBudget", "Compressor", "Generation", "H2O", "KVCache", "KnormPress", "MODEL_NAMES",
           "NoCompression", "Oracle", "Prefill", "Pythia", "PythiaConfig", "PyramidKV", "RandomEviction", "SnapKV",
           "StreamingLLM", "TOVA", "Tokenizer", "attention_weights", "build_compressor", "generate",
           "import_policies", "oracle_future_queries", "register"]
