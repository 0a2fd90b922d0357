from dataclasses import dataclass

from .base import Compressor


@dataclass
class NoCompression(Compressor):
    """Keeps the full KV cache: the reference every policy is compared with."""

    name = "none"

    def keep_count(self, layer, seq_len):
        return seq_len
