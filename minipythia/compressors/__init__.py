"""KV-cache compression policies. A policy is one file in this folder: a `Compressor` dataclass with
`keep_count()` and `score()`, decorated with `@register` (see base.py for what else it may declare).
Every module here is imported below, so a new file registers itself; its class is also exported here and from
`minipythia` (tests/test_front_door.py keeps the exports and the registry equal)."""

import importlib
import pkgutil

from .base import CapacityBudget, Compressor, attention_weights
from .registry import COMPRESSORS, build_compressor, import_policies, policy_class, register

# The built-in policies by name, in the order the CLIs list them; then any other module of this folder.
from .none import NoCompression  # noqa: I001
from .knorm import KnormPress
from .snapkv import SnapKV
from .streaming_llm import StreamingLLM
from .h2o import H2O
from .tova import TOVA
from .random_eviction import RandomEviction
from .pyramidkv import PyramidKV
from .oracle import Oracle, oracle_future_queries
# The others in the order of their files, as the loop below used to register them.
from .adakv import AdaKV
from .chunkkv import ChunkKV
from .criticalkv import CriticalAdaKV, CriticalKV
from .duo_attention import DuoAttention
from .expected_attention import ExpectedAttention
from .keydiff import KeyDiff
from .kvzip import KVzip
from .lagkv import LagKV
from .merging import Merging
from .per_layer import PerLayer
from .think import ThinK

for _module in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_module.name}")

__all__ = ["COMPRESSORS", "H2O", "TOVA", "AdaKV", "CapacityBudget", "ChunkKV", "Compressor", "CriticalAdaKV",
           "CriticalKV", "DuoAttention", "ExpectedAttention", "KVzip", "KeyDiff", "KnormPress", "LagKV", "Merging",
           "NoCompression", "Oracle", "PerLayer", "PyramidKV", "RandomEviction", "SnapKV", "StreamingLLM", "ThinK",
           "attention_weights", "build_compressor", "import_policies", "oracle_future_queries", "policy_class",
           "register"]
