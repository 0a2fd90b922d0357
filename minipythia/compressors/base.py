"""The interface every KV-cache compression policy implements.

A policy says how many entries a layer keeps per head (`keep_count`) and scores each cached entry
(`score`, higher = keep). The cache does the rest in one shared step: top-k per (batch, head), kept in
position order, gathered into new tensors (see `KVCache.compress`).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import ClassVar

import torch


@dataclass
class Compressor:
    name: ClassVar[str]

    def keep_count(self, layer: int, seq_len: int) -> int:
        """Entries to keep per head in `layer` when the prefill left `seq_len`; >= seq_len keeps all."""
        raise NotImplementedError

    def score(self, layer: int, keys: torch.Tensor, values: torch.Tensor, queries: torch.Tensor) -> torch.Tensor:
        """keys, values (B, nh, L, hs) and the prefill's queries (B, nh, L, hs), after rotary -> (B, nh, L)."""
        raise NotImplementedError

    def settings(self) -> dict:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}

    @property
    def label(self) -> str:
        """A short name for tables and folder names, e.g. 'snapkv_w32_c512_k5_avgpool'."""
        parts = [self.name] + [_short(k, v) for k, v in self.settings().items() if v not in ((), [], None)]
        return "_".join(parts)


_ABBREVIATIONS = {"window_size": "w", "max_capacity_prompt": "c", "kernel_size": "k", "compression_ratio": "r",
                  "skip_layers": "skip", "n_sink": "sink", "recent_ratio": "recent", "num_layers": "layers"}


def _short(key, value) -> str:
    if key == "pooling":
        return str(value)
    if isinstance(value, list):
        value = "-".join(map(str, value))
    return f"{_ABBREVIATIONS.get(key, key)}{value}"
