"""A KV cache that stores what its compressor keeps bit-packed (KIVI, Liu et al. 2024), composable with any
eviction policy: the compressor's `kv_bits`, `kv_group_size` (G) and `kv_residual` (R) settings.

The prefill is stored and compressed (evicted) in full precision, as in every cache; then each layer's kept
entries are quantized (minipythia.quantization), the newest ones excepted, as KIVI does:
- keys, per channel in groups of G tokens: the first n - n % R entries are quantized and the other n % R stay
  in full precision; during decoding, new keys join that full-precision tail, which is quantized whole
  whenever it reaches R entries;
- values, per token (in groups of G channels when G divides the head size, else the whole head): all but the
  newest R entries are quantized; during decoding, the oldest value of the tail is quantized as each new one
  arrives.
Attention reads the dequantized entries (computed in float32, returned in the model's dtype) followed by the
tails, at every forward; nothing but the codes, their float16 minima and scales, the tails and the
positions is held between forwards, so `nbytes` is what the cache really takes.
"""

from __future__ import annotations

import torch

from .cache import KVCache, extended
from .quantization import Quantized, quantize


class QuantizedKVCache(KVCache):
    def __init__(self, config, batch_size: int = 1, dtype=torch.float32, device="cpu", compressor=None,
                 decode_interval: int | None = None, record_queries: bool = False):
        if compressor is None or compressor.kv_bits is None:
            raise ValueError("a quantized cache needs a compressor with kv_bits set (e.g. NoCompression(kv_bits=4))")
        if decode_interval is not None:
            raise ValueError("decode_interval (compressing during decoding) cannot be combined with kv_bits: a "
                             "quantized group of keys cannot lose some of its entries; leave one of them unset")
        self.bits, self.residual = compressor.kv_bits, compressor.kv_residual
        self.key_group = compressor.kv_group_size
        self.value_group = self.key_group if config.head_size % self.key_group == 0 else config.head_size
        super().__init__(config, batch_size, dtype, device, compressor, decode_interval, record_queries)

    def reset(self):
        super().reset()
        n = self.num_layers
        self._quantized_keys: list[Quantized | None] = [None] * n  # the oldest entries' keys
        self._quantized_values: list[Quantized | None] = [None] * n
        self._key_tail: list[torch.Tensor | None] = [None] * n  # (B, nh, capacity, hs), the newest keys
        self._value_tail: list[torch.Tensor | None] = [None] * n
        self._key_tail_len = [0] * n
        self._value_tail_len = [0] * n

    def _quantized(self, layer: int) -> bool:
        return self._key_tail[layer] is not None

    def keys(self, layer: int) -> torch.Tensor:
        if not self._quantized(layer):
            return super().keys(layer)
        return self._joined(self._quantized_keys[layer], self._key_tail[layer], self._key_tail_len[layer])

    def values(self, layer: int) -> torch.Tensor:
        if not self._quantized(layer):
            return super().values(layer)
        return self._joined(self._quantized_values[layer], self._value_tail[layer], self._value_tail_len[layer])

    def _joined(self, quantized: Quantized | None, tail: torch.Tensor, tail_len: int) -> torch.Tensor:
        tail = tail[:, :, :tail_len]
        return tail if quantized is None else torch.cat((quantized.dequantize(self.dtype), tail), dim=2)

    def append(self, layer: int, k: torch.Tensor, v: torch.Tensor):
        if not self._quantized(layer):  # the prefill: stored whole, compressed, then quantized (after_attention)
            return super().append(layer, k, v)
        self._append_positions(layer, k.size(2))
        self._key_tail[layer], self._key_tail_len[layer] = extended(self._key_tail[layer],
                                                                    self._key_tail_len[layer], k)
        self._value_tail[layer], self._value_tail_len[layer] = extended(self._value_tail[layer],
                                                                        self._value_tail_len[layer], v)
        return self.keys(layer), self.values(layer)

    def after_attention(self, layer: int, queries: torch.Tensor):
        prefill = self.in_prefill
        super().after_attention(layer, queries)  # the prefill's eviction, in full precision
        if prefill:
            self._quantize_prefill(layer)
        else:
            self._flush(layer)

    def _quantize_prefill(self, layer: int):
        """The kept entries: keys but the last n % R, values but the last R, quantized; the rest in tails.
        The full-precision buffers of the prefill are let go."""
        keys, values = super().keys(layer), super().values(layer)
        n = keys.size(2)
        n_keys = n - n % self.residual
        n_values = max(0, n - self.residual)
        self._quantized_keys[layer] = self._quantize(keys[:, :, :n_keys], True) if n_keys else None
        self._quantized_values[layer] = self._quantize(values[:, :, :n_values], False) if n_values else None
        self._key_tail[layer], self._key_tail_len[layer] = keys[:, :, n_keys:].clone(), n - n_keys
        self._value_tail[layer], self._value_tail_len[layer] = values[:, :, n_values:].clone(), n - n_values
        self._positions[layer] = self.positions(layer).clone()  # exactly the kept entries' positions
        self._keys[layer] = self._values[layer] = None

    def _flush(self, layer: int):
        """KIVI's decoding: a full tail of R keys is quantized whole; values beyond the newest R, one by one."""
        if self._key_tail_len[layer] >= self.residual:
            full = self._key_tail[layer][:, :, : self.residual]
            self._quantized_keys[layer] = self._append_quantized(self._quantized_keys[layer],
                                                                 self._quantize(full, True))
            self._key_tail[layer], self._key_tail_len[layer] = self._drop_front(
                self._key_tail[layer], self._key_tail_len[layer], self.residual)
        extra = self._value_tail_len[layer] - self.residual
        if extra > 0:
            old = self._value_tail[layer][:, :, :extra]
            self._quantized_values[layer] = self._append_quantized(self._quantized_values[layer],
                                                                   self._quantize(old, False))
            self._value_tail[layer], self._value_tail_len[layer] = self._drop_front(
                self._value_tail[layer], self._value_tail_len[layer], extra)

    def _quantize(self, x: torch.Tensor, keys: bool) -> Quantized:
        return quantize(x, self.bits, self.key_group if keys else self.value_group, along_tokens=keys)

    @staticmethod
    def _append_quantized(old: Quantized | None, new: Quantized) -> Quantized:
        return new if old is None else old.cat(new)

    @staticmethod
    def _drop_front(tail: torch.Tensor, length: int, count: int) -> tuple[torch.Tensor, int]:
        return tail[:, :, count:length].clone(), length - count  # a copy, so that the old buffer is freed

    def _layer_nbytes(self, layer: int) -> int:
        if not self._quantized(layer):
            return super()._layer_nbytes(layer)
        held = [self._key_tail[layer], self._value_tail[layer], self._positions[layer]]
        quantized = [q for q in (self._quantized_keys[layer], self._quantized_values[layer]) if q is not None]
        return sum(t.untyped_storage().nbytes() for t in held) + sum(q.nbytes for q in quantized)
