"""minipythia: Pythia (GPT-NeoX) from scratch in PyTorch, with a native, compressible KV cache."""

from .cache import KVCache
from .compressors import (COMPRESSORS, H2O, TOVA, Compressor, KnormPress, NoCompression, Oracle, PyramidKV,
                          RandomEviction, SnapKV, StreamingLLM, oracle_future_queries)
from .config import MODEL_NAMES, PythiaConfig
from .generation import Generation, generate
from .model import Pythia
from .tokenizer import Tokenizer

__all__ = ["COMPRESSORS", "Compressor", "Generation", "H2O", "KVCache", "KnormPress", "MODEL_NAMES", "NoCompression",
           "Oracle", "Pythia", "PythiaConfig", "PyramidKV", "RandomEviction", "SnapKV", "StreamingLLM", "TOVA",
           "Tokenizer", "generate", "oracle_future_queries"]
