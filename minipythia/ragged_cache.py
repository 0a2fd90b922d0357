"""A KV cache whose heads keep different numbers of entries, and hold only those: for a head-wise policy
(`headwise`, whose `select()` says which entries each head keeps; AdaKV and the like).

The prefill is stored whole, as in every cache; at its end, each layer's kept entries are packed, head after
head: keys and values (N, hs) with their positions (N,), N the entries kept over all heads and batch rows,
and the count per head (B, nh). Later tokens are appended to every head alike, in a dense tail (B, nh, t, hs).
Attention reads each layer padded to its longest head: (B, nh, n_max + t, hs), the padding masked out
(`key_padding`); that tensor exists during a forward only. `nbytes` is the packed entries, the tails and the
bookkeeping (positions and counts).

`positions(layer)` is (B, nh, n_max + t) like the keys, with -1 at the padding; `lengths(layer)` (B, nh) is
what each head holds.
"""

from __future__ import annotations

import torch

from .cache import KVCache, extended
from .timing import clock


class RaggedKVCache(KVCache):
    def __init__(self, config, batch_size: int = 1, dtype=torch.float32, device="cpu", compressor=None,
                 decode_interval: int | None = None, record_queries: bool = False):
        if compressor is None or not compressor.headwise:
            raise ValueError("a ragged cache needs a head-wise compressor (headwise)")
        if decode_interval is not None:
            raise ValueError(f"{compressor.name} sets each head's budget at the prefill: it cannot compress during "
                             f"decoding; leave decode_interval unset")
        if compressor.kv_bits is not None or compressor.prunes_key_channels:
            raise ValueError(f"{compressor.name} keeps a different number of entries per head, which quantized or "
                             f"pruned storage does not combine with yet; leave kv_bits unset")
        super().__init__(config, batch_size, dtype, device, compressor, decode_interval, record_queries)

    def reset(self):
        super().reset()
        n = self.num_layers
        self._packed: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None] = [None] * n  # keys, values, positions
        self._counts: list[torch.Tensor | None] = [None] * n  # (B, nh) entries kept per head
        self._tails: list[tuple[torch.Tensor, torch.Tensor] | None] = [None] * n  # (B, nh, capacity, hs) each
        self._tail_len = [0] * n
        self._tail_start = [0] * n  # the position of the first tail token

    def _ragged(self, layer: int) -> bool:
        return self._packed[layer] is not None

    def _select(self, layer: int, queries: torch.Tensor):
        if not self.in_prefill:
            return super()._select(layer, queries)
        start = clock(self.device)
        keys, values, positions = super().keys(layer), super().values(layer), super().positions(layer)
        n = keys.size(2)
        keep = self.compressor.keep_count(layer, n)
        if keep >= n:
            mask = torch.ones(keys.shape[:3], dtype=torch.bool, device=keys.device)
        else:
            mask = self.compressor.select(layer, self.compressor.score(layer, keys, values, queries), keep)
        # Packed in (batch, head, position) order: each head's entries together, in position order.
        self._packed[layer] = (keys[mask], values[mask], positions[mask])
        self._counts[layer] = mask.sum(dim=-1)
        self._tails[layer] = (keys.new_empty(*keys.shape[:2], 0, self.head_size),) * 2
        self._tail_len[layer], self._tail_start[layer] = 0, self.seen + n
        self._keys[layer] = self._values[layer] = self._positions[layer] = None
        self._lengths[layer] = int(self._counts[layer].max())
        self.compress_seconds += clock(self.device) - start

    def lengths(self, layer: int) -> torch.Tensor:
        if not self._ragged(layer):
            return super().lengths(layer)
        return self._counts[layer] + self._tail_len[layer]

    def _padded(self, layer: int, packed: torch.Tensor, fill) -> torch.Tensor:
        """The packed entries of a layer laid out (B, nh, n_max, ...), `fill` where a head has fewer."""
        counts = self._counts[layer]
        B, H = counts.shape
        n_max = int(counts.max())
        slot = torch.arange(n_max, device=counts.device).expand(B, H, n_max) < counts[..., None]  # (B, nh, n_max)
        out = packed.new_full((B, H, n_max, *packed.shape[1:]), fill)
        out[slot] = packed  # the slots in (batch, head, position) order, as packed
        return out

    def keys(self, layer: int) -> torch.Tensor:
        if not self._ragged(layer):
            return super().keys(layer)
        tail = self._tails[layer][0][:, :, : self._tail_len[layer]]
        return torch.cat((self._padded(layer, self._packed[layer][0], 0.0), tail), dim=2)

    def values(self, layer: int) -> torch.Tensor:
        if not self._ragged(layer):
            return super().values(layer)
        tail = self._tails[layer][1][:, :, : self._tail_len[layer]]
        return torch.cat((self._padded(layer, self._packed[layer][1], 0.0), tail), dim=2)

    def positions(self, layer: int) -> torch.Tensor:
        if not self._ragged(layer):
            return super().positions(layer)
        B, H = self._counts[layer].shape
        start, t = self._tail_start[layer], self._tail_len[layer]
        tail = torch.arange(start, start + t, device=self.device).expand(B, H, t)
        return torch.cat((self._padded(layer, self._packed[layer][2], -1), tail), dim=2)

    def key_padding(self, layer: int) -> torch.Tensor | None:
        """BoolTensor (B, nh, n_max + t): which of keys(layer) are entries (False: padding)."""
        if not self._ragged(layer):
            return None
        counts = self._counts[layer]
        B, H = counts.shape
        n_max = int(counts.max())
        slot = torch.arange(n_max + self._tail_len[layer], device=counts.device).expand(B, H, -1)
        return (slot < counts[..., None]) | (slot >= n_max)

    def append(self, layer: int, k: torch.Tensor, v: torch.Tensor):
        if not self._ragged(layer):
            return super().append(layer, k, v)
        keys, values = self._tails[layer]
        keys, _ = extended(keys, self._tail_len[layer], k)
        values, self._tail_len[layer] = extended(values, self._tail_len[layer], v)
        self._tails[layer] = (keys, values)
        self._lengths[layer] = int(self._counts[layer].max()) + self._tail_len[layer]
        return self.keys(layer), self.values(layer)

    def _layer_nbytes(self, layer: int) -> int:
        if not self._ragged(layer):
            return super()._layer_nbytes(layer)
        held = (*self._packed[layer], self._counts[layer], *self._tails[layer])
        return sum(t.untyped_storage().nbytes() for t in held)
