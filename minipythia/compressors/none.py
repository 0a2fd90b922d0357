from dataclasses import dataclass

from .base import Compressor
from .registry import register


@register
@dataclass
class NoCompression(Compressor):
    """Keeps the full KV cache: the reference every policy is compared with."""

    name = "none"

    def keep_count(self, layer, seq_len):
        return seq_len

    def score(self, layer, keys, values, queries):
        raise AssertionError("never called: keep_count keeps every entry")

    def decode_queries(self):
        return 0  # never evicts
