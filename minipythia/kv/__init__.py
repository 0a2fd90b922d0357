"""The KV cache (cache.py) and the stores its layers hold: one interface (store.py), one file per kind."""

from .cache import KVCache, check_decode_interval
from .dense import DenseStore
from .pruned_keys import PrunedKeysStore
from .quantized import QuantizedStore
from .ragged import RaggedStore
from .store import Store

__all__ = ["DenseStore", "KVCache", "PrunedKeysStore", "QuantizedStore", "RaggedStore", "Store",
           "check_decode_interval"]
