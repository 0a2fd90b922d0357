"""A KV cache that stores only the key channels its compressor keeps (ThinK, Xu et al. 2024): for a policy
with `prunes_key_channels`, whose `key_channels()` names, per head, the channels of the prompt's keys to keep.

The prefill is stored and evicted in full precision, as in every cache; then each layer's kept keys are cut to
their kept channels, (B, nh, k, d') with the channels' indices (B, nh, d'), and the full-width buffer is let
go. Keys of later tokens are stored whole (ThinK prunes the prompt's), values are untouched. Attention reads
the pruned keys with zeros in their dropped channels (so q . k sums over the kept channels only, what pruning
means), followed by the whole ones; that full-width tensor exists during a forward only, and `nbytes` is what
the cache really holds between forwards.
"""

from __future__ import annotations

import torch

from .cache import KVCache, extended


class PrunedKeysCache(KVCache):
    def __init__(self, config, batch_size: int = 1, dtype=torch.float32, device="cpu", compressor=None,
                 decode_interval: int | None = None, record_queries: bool = False):
        if compressor is None or not compressor.prunes_key_channels:
            raise ValueError("a pruned-keys cache needs a compressor that prunes key channels (prunes_key_channels)")
        if decode_interval is not None:
            raise ValueError(f"{compressor.name} prunes the prompt's key channels once, at the prefill: it cannot "
                             f"compress during decoding; leave decode_interval unset")
        if compressor.kv_bits is not None:
            raise ValueError(f"{compressor.name} prunes key channels, which quantized storage (kv_bits) does not "
                             f"combine with yet; leave kv_bits unset")
        super().__init__(config, batch_size, dtype, device, compressor, decode_interval, record_queries)

    def reset(self):
        super().reset()
        n = self.num_layers
        self._pruned: list[torch.Tensor | None] = [None] * n  # (B, nh, k, d') the prompt's keys, kept channels
        self._channels: list[torch.Tensor | None] = [None] * n  # (B, nh, d') their indices
        self._key_tail: list[torch.Tensor | None] = [None] * n  # (B, nh, capacity, hs) later keys, whole
        self._key_tail_len = [0] * n

    def keys(self, layer: int) -> torch.Tensor:
        if self._pruned[layer] is None:
            return super().keys(layer)
        pruned, channels = self._pruned[layer], self._channels[layer]
        B, H, k, _ = pruned.shape
        full = pruned.new_zeros(B, H, k, self.head_size)
        full.scatter_(3, channels[:, :, None, :].expand(-1, -1, k, -1), pruned)  # (B, nh, k, hs)
        return torch.cat((full, self._key_tail[layer][:, :, : self._key_tail_len[layer]]), dim=2)

    def append(self, layer: int, k: torch.Tensor, v: torch.Tensor):
        if self._pruned[layer] is None:  # the prefill: stored whole, evicted, then pruned (after_attention)
            return super().append(layer, k, v)
        n = self._lengths[layer]
        self._values[layer], _ = extended(self._values[layer], n, v)
        self._append_positions(layer, k.size(2))
        self._key_tail[layer], self._key_tail_len[layer] = extended(self._key_tail[layer],
                                                                    self._key_tail_len[layer], k)
        return self.keys(layer), self.values(layer)

    def after_attention(self, layer: int, queries: torch.Tensor):
        prefill = self.in_prefill
        super().after_attention(layer, queries)  # the prefill's eviction
        if prefill:
            keys = super().keys(layer)
            channels = self.compressor.key_channels(layer, keys, queries)  # (B, nh, d')
            self._pruned[layer] = keys.gather(3, channels[:, :, None, :].expand(-1, -1, keys.size(2), -1))
            self._channels[layer] = channels
            self._key_tail[layer] = keys.new_empty(*keys.shape[:2], 0, self.head_size)
            self._keys[layer] = None

    def _layer_nbytes(self, layer: int) -> int:
        if self._pruned[layer] is None:
            return super()._layer_nbytes(layer)
        held = (self._pruned[layer], self._channels[layer], self._key_tail[layer], self._values[layer],
                self._positions[layer])
        return sum(t.untyped_storage().nbytes() for t in held)
