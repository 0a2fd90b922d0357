"""minipythia: Pythia (GPT-NeoX) from scratch in PyTorch, with a native, compressible KV cache."""

from .cache import KVCache
from .compressors import COMPRESSORS, Compressor, KnormPress, NoCompression, SnapKV
from .config import MODEL_NAMES, PythiaConfig
from .generation import Generation, generate
from .model import Pythia
from .tokenizer import Tokenizer

__all__ = ["COMPRESSORS", "Compressor", "Generation", "KVCache", "KnormPress", "MODEL_NAMES", "NoCompression", "Pythia",
           "PythiaConfig", "SnapKV", "Tokenizer", "generate"]
