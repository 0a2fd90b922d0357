"""minipythia: Pythia (GPT-NeoX) from scratch in PyTorch, with a native, compressible KV cache."""

from .compressors import (COMPRESSORS, H2O, TOVA, AdaKV, CapacityBudget, ChunkKV, Compressor, CriticalAdaKV,
                          CriticalKV, DuoAttention, ExpectedAttention, KeyDiff, KnormPress, KVzip, LagKV, Merging,
                          NoCompression, Oracle, PerLayer, PyramidKV, RandomEviction, SnapKV, StreamingLLM, ThinK,
                          attention_weights, build_compressor, import_policies, oracle_future_queries, register)
from .config import MODEL_NAMES, PythiaConfig
from .generate import Generation, generate
from .kv import KVCache
from .model import Pythia
from .prefill import Prefill, Prompt
from .tokenizer import Tokenizer

__all__ = ["COMPRESSORS", "H2O", "TOVA", "AdaKV", "CapacityBudget", "ChunkKV", "Compressor", "CriticalAdaKV",
           "CriticalKV", "DuoAttention", "ExpectedAttention", "Generation", "KVCache", "KVzip", "KeyDiff", "KnormPress",
           "LagKV", "MODEL_NAMES", "Merging", "NoCompression", "Oracle", "PerLayer", "Prefill", "Prompt", "Pythia",
           "PythiaConfig", "PyramidKV", "RandomEviction", "SnapKV", "StreamingLLM", "ThinK", "Tokenizer",
           "attention_weights", "build_compressor", "generate", "import_policies", "oracle_future_queries",
           "register"]
