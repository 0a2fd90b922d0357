"""The KV cache the model owns: per layer K (after rotary), V and each entry's original position.

`seen` counts the tokens the model has processed; it is the rotary position of the next token, whatever
a compressor has evicted. After compression each layer holds freshly allocated tensors with only the
kept entries, so the memory of evicted entries is really released.
"""

from __future__ import annotations

import time

import torch

from .config import PythiaConfig

# Decoding appends one token at a time; growing the buffers in chunks keeps that from copying every step.
GROWTH = 64


class KVCache:
    def __init__(self, config: PythiaConfig, batch_size: int = 1, dtype=torch.float32, device="cpu",
                 compressor=None):
        self.batch_size = batch_size
        self.n_heads = config.num_attention_heads
        self.head_size = config.head_size
        self.dtype, self.device = dtype, torch.device(device)
        self.compressor = compressor
        n = config.num_hidden_layers
        self._keys: list[torch.Tensor | None] = [None] * n  # (B, nh, capacity, hs)
        self._values: list[torch.Tensor | None] = [None] * n
        self._positions: list[torch.Tensor | None] = [None] * n  # (B, nh, capacity) int64
        self._lengths = [0] * n  # entries in use per layer
        self._new_positions: torch.Tensor | None = None  # positions of the forward being stored, see append
        self.seen = 0
        self.nbytes_before_compression: int | None = None  # set by the compression at the end of the prefill
        self.compress_seconds = 0.0  # time spent compressing (scoring, top-k, gather), part of the prefill

    @property
    def num_layers(self) -> int:
        return len(self._keys)

    @property
    def in_prefill(self) -> bool:
        """True during the first forward into an empty cache: the one whose end triggers the compressor."""
        return self.seen == 0 and self.compressor is not None

    def __len__(self) -> int:
        """Entries kept per head in layer 0 (layers may differ when a compressor skips some)."""
        return self._lengths[0]

    def length(self, layer: int) -> int:
        return self._lengths[layer]

    def keys(self, layer: int) -> torch.Tensor:
        return self._keys[layer][:, :, : self._lengths[layer]]

    def values(self, layer: int) -> torch.Tensor:
        return self._values[layer][:, :, : self._lengths[layer]]

    def positions(self, layer: int) -> torch.Tensor:
        """Original token position of each kept entry: LongTensor (B, nh, n)."""
        return self._positions[layer][:, :, : self._lengths[layer]]

    @property
    def nbytes(self) -> int:
        """Bytes the cache's tensors really hold (allocated capacity, positions included)."""
        return sum(self._layer_nbytes(layer) for layer in range(self.num_layers))

    def append(self, layer: int, k: torch.Tensor, v: torch.Tensor):
        """Stores k, v (B, nh, T, hs) at positions seen .. seen+T-1; returns all entries of the layer."""
        T = k.size(2)
        n = self._lengths[layer]
        buf = self._keys[layer]
        if buf is None or n + T > buf.size(2):
            # The prefill allocates exactly what it needs; later appends grow in chunks.
            self._grow(layer, n + T if buf is None else n + T + GROWTH)
        if layer == 0:  # every layer stores the same positions: one arange per forward, not per layer
            self._new_positions = torch.arange(self.seen, self.seen + T, device=self.device)
        self._keys[layer][:, :, n : n + T] = k
        self._values[layer][:, :, n : n + T] = v
        self._positions[layer][:, :, n : n + T] = self._new_positions
        self._lengths[layer] = n + T
        return self.keys(layer), self.values(layer)

    def _grow(self, layer: int, capacity: int):
        B, H, D, n = self.batch_size, self.n_heads, self.head_size, self._lengths[layer]
        keys = torch.empty(B, H, capacity, D, dtype=self.dtype, device=self.device)
        values = torch.empty_like(keys)
        positions = torch.empty(B, H, capacity, dtype=torch.long, device=self.device)
        if n:
            keys[:, :, :n] = self.keys(layer)
            values[:, :, :n] = self.values(layer)
            positions[:, :, :n] = self.positions(layer)
        self._keys[layer], self._values[layer], self._positions[layer] = keys, values, positions

    def advance(self, num_tokens: int):
        """Called by the model once every layer has stored a forward's tokens."""
        self.seen += num_tokens

    def compress(self, layer: int, queries: torch.Tensor):
        """Runs the compressor on one layer. `queries` (B, nh, T, hs) are the prefill's, after rotary.

        The one shared selection step: each policy only scores entries; here the top `keep` per
        (batch, head) are kept, in position order, in new tensors of exactly that size.
        """
        start = time.perf_counter()
        n = self._lengths[layer]
        if layer == 0:  # layers are compressed in order, each right after its prefill attention
            self.nbytes_before_compression = 0
        self.nbytes_before_compression += self._layer_nbytes(layer)
        keep = self.compressor.keep_count(layer, n)
        if keep < n:
            keys, values = self.keys(layer), self.values(layer)
            scores = self.compressor.score(layer, keys, values, queries)  # (B, nh, n)
            idx = scores.topk(keep, dim=-1).indices.sort(dim=-1).values  # (B, nh, keep)
            self.keep(layer, idx)
        self.compress_seconds += time.perf_counter() - start

    def keep(self, layer: int, idx: torch.Tensor):
        """Keeps only the entries at indices idx (B, nh, k) of a layer, in freshly allocated tensors."""
        gather_idx = idx.unsqueeze(-1).expand(-1, -1, -1, self.head_size)  # (B, nh, k, hs)
        self._keys[layer] = self.keys(layer).gather(2, gather_idx)
        self._values[layer] = self.values(layer).gather(2, gather_idx)
        self._positions[layer] = self.positions(layer).gather(2, idx)
        self._lengths[layer] = idx.size(-1)

    def _layer_nbytes(self, layer: int) -> int:
        tensors = (self._keys[layer], self._values[layer], self._positions[layer])
        return sum(t.untyped_storage().nbytes() for t in tensors if t is not None)
