"""What another store holds, bit-packed (KIVI, Liu et al. 2024): a wrapper over a store of any kind, for a policy
with `kv_bits` (and `kv_group_size` G, `kv_residual` R).

Built over a layer's kept entries once the policy has evicted (and pruned) them, in full precision; then, as
KIVI does (the quantization itself: minipythia.kv.quantization):
- keys, per channel in groups of G tokens: the first n - n % R entries are quantized and the other n % R stay
  in full precision; new keys join that full-precision tail, which is quantized whole whenever it reaches R
  entries (at the end of a forward, `settle`);
- values, per token (in groups of G channels when G divides the head size, else the whole head): all but the
  newest R entries are quantized; as new ones arrive, those beyond the newest R are quantized.
Keys pruned to some channels (ThinK) are quantized in those channels, with a residual of their own that stays
in full precision; later keys, whole, then form the sequence above from their first.
Attention reads the dequantized entries (computed in float32, returned in the model's dtype) followed by the
tails; nothing but the codes, their float16 minima and scales, the tails and the positions is held between
forwards. Evicting from it (a policy compressing during decoding) dequantizes, keeps, and quantizes the kept
entries again, as at the prefill.
"""

from __future__ import annotations

import torch

from .dense import DenseStore
from .pruned_keys import widened
from .quantization import Quantized, quantize
from .store import Store, extended, tensor_bytes


class QuantizedStore(Store):
    def __init__(self, store: Store, bits: int, group_size: int, residual: int):
        keys, values, positions, channels = store.parts()
        B, H, n, hs = values.shape
        self.bits, self.residual, self.key_group = bits, residual, group_size
        self.value_group = group_size if hs % group_size == 0 else hs
        self.head_size, self.dtype = hs, values.dtype
        n_keys = n - n % residual
        quantized = self._quantize(keys[:, :, :n_keys], True) if n_keys else None
        rest = keys[:, :, n_keys:].clone()
        self.pruned: tuple[Quantized | None, torch.Tensor, torch.Tensor] | None = None
        if channels is None:
            self._keys, self._key_tail, self._key_tail_len = quantized, rest, n - n_keys
        else:  # the prompt's pruned keys apart; later keys start a sequence of their own
            self.pruned = (quantized, rest, channels)
            self._keys, self._key_tail, self._key_tail_len = None, values.new_empty(B, H, 0, hs), 0
        n_values = max(0, n - residual)
        self._values = self._quantize(values[:, :, :n_values], False) if n_values else None
        self._value_tail, self._value_tail_len = values[:, :, n_values:].clone(), n - n_values
        self._positions, self._length = positions.clone(), n

    def _quantize(self, x: torch.Tensor, keys: bool) -> Quantized:
        return quantize(x, self.bits, self.key_group if keys else self.value_group, along_tokens=keys)

    def _joined(self, quantized: Quantized | None, tail: torch.Tensor) -> torch.Tensor:
        return tail if quantized is None else torch.cat((quantized.dequantize(self.dtype), tail), dim=2)

    def read(self):
        keys = self._joined(self._keys, self._key_tail[:, :, : self._key_tail_len])
        if self.pruned is not None:
            quantized, rest, channels = self.pruned
            keys = torch.cat((widened(self._joined(quantized, rest), channels, self.head_size), keys), dim=2)
        return keys, self._joined(self._values, self._value_tail[:, :, : self._value_tail_len])

    def positions(self):
        return self._positions[:, :, : self._length]

    def lengths(self):
        return torch.full(self._positions.shape[:2], self._length, dtype=torch.long)

    @property
    def length(self):
        return self._length

    def append(self, k, v, positions):
        self._positions, self._length = extended(self._positions, self._length, positions.expand(
            *self._positions.shape[:2], -1))
        self._key_tail, self._key_tail_len = extended(self._key_tail, self._key_tail_len, k)
        self._value_tail, self._value_tail_len = extended(self._value_tail, self._value_tail_len, v)

    def settle(self):
        """KIVI's decoding: a full tail of R keys is quantized whole; values beyond the newest R, one by one."""
        if self._key_tail_len >= self.residual:
            full = self._key_tail[:, :, : self.residual]
            self._keys = self._appended(self._keys, self._quantize(full, True))
            self._key_tail, self._key_tail_len = self._drop_front(self._key_tail, self._key_tail_len, self.residual)
        extra = self._value_tail_len - self.residual
        if extra > 0:
            old = self._value_tail[:, :, :extra]
            self._values = self._appended(self._values, self._quantize(old, False))
            self._value_tail, self._value_tail_len = self._drop_front(self._value_tail, self._value_tail_len, extra)

    @staticmethod
    def _appended(old: Quantized | None, new: Quantized) -> Quantized:
        return new if old is None else old.cat(new)

    @staticmethod
    def _drop_front(tail: torch.Tensor, length: int, count: int) -> tuple[torch.Tensor, int]:
        return tail[:, :, count:length].clone(), length - count  # a copy, so that the old buffer is freed

    def keep(self, idx, values=None):
        dense = DenseStore(*self.read(), self.positions(), self._length).keep(idx, values)
        return QuantizedStore(dense, self.bits, self.key_group, self.residual)

    @property
    def nbytes(self):
        quantized = [q for q in (self._keys, self._values) if q is not None]
        held = [self._key_tail, self._value_tail, self._positions]
        if self.pruned is not None:
            quantized += [self.pruned[0]] if self.pruned[0] is not None else []
            held += list(self.pruned[1:])
        return tensor_bytes(*held) + sum(q.nbytes for q in quantized)
