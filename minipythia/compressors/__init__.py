"""KV-cache compression policies. A policy is one file in this folder: a `Compressor` dataclass with
`keep_count()` and `score()`, decorated with `@register` (see base.py for what else it may declare).
Every module here is imported below, so a new file needs no other edit."""

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

for _module in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_module.name}")

__all__ = ["COMPRESSORS", "CapacityBudget", "Compressor", "H2O", "KnormPress", "NoCompression", "Oracle", "PyramidKV",
           "RandomEviction", "SnapKV", "StreamingLLM", "TOVA", "attention_weights", "build_compressor",
           "import_policies", "oracle_future_queries", "policy_class", "register"]
