from dataclasses import dataclass

import torch

from .base import Compressor


@dataclass
class KnormPress(Compressor):
    """Keeps the keys with the lowest L2 norm, per head (Devoto et al. 2024; NVIDIA kvpress `KnormPress`).

    kvpress compresses every layer; the paper's variant leaves layers 0 and 1 whole (skip_layers=(0, 1)).
    """

    name = "knorm"
    compression_ratio: float = 0.5
    skip_layers: tuple[int, ...] = ()

    def __post_init__(self):
        if not 0.0 <= self.compression_ratio < 1.0:
            raise ValueError(f"compression_ratio must be in [0, 1) (fraction of entries evicted), got {self.compression_ratio}")
        self.skip_layers = tuple(self.skip_layers)

    def keep_count(self, layer, seq_len):
        if layer in self.skip_layers:
            return seq_len
        return max(1, int(seq_len * (1 - self.compression_ratio)))

    def score(self, layer, keys, values, queries):
        return -keys.float().norm(dim=-1)
