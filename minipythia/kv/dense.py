"""Every head of a layer holds the same number of entries, in position order: the prefill's store, and that of
every policy with one budget for all heads."""

from __future__ import annotations

import torch

from ..rotary import rotated_by
from .store import GROWTH, Store, tensor_bytes


class DenseStore(Store):
    """Keys, values (B, nh, capacity, hs) and positions (B, nh, capacity), the first `length` slots in use. The
    first append allocates exactly what it needs (the prefill); later ones grow the buffers in chunks."""

    def __init__(self, keys: torch.Tensor, values: torch.Tensor, positions: torch.Tensor, length: int):
        self._keys, self._values, self._positions, self._length = keys, values, positions, length

    @classmethod
    def empty(cls, batch_size: int, n_heads: int, head_size: int, dtype, device) -> "DenseStore":
        keys = torch.empty(batch_size, n_heads, 0, head_size, dtype=dtype, device=device)
        positions = torch.empty(batch_size, n_heads, 0, dtype=torch.long, device=device)
        return cls(keys, torch.empty_like(keys), positions, 0)

    def append(self, k, v, positions):
        n, T = self._length, k.size(2)
        if n + T > self._keys.size(2):
            self._grow(n + T if n == 0 else n + T + GROWTH)
        self._keys[:, :, n : n + T] = k
        self._values[:, :, n : n + T] = v
        self._positions[:, :, n : n + T] = positions
        self._length = n + T

    def _grow(self, capacity: int):
        n = self._length
        keys = self._keys.new_empty(*self._keys.shape[:2], capacity, self._keys.size(3))
        values = torch.empty_like(keys)
        positions = self._positions.new_empty(*self._positions.shape[:2], capacity)
        if n:
            keys[:, :, :n], values[:, :, :n], positions[:, :, :n] = self.read() + (self.positions(),)
        self._keys, self._values, self._positions = keys, values, positions

    def read(self):
        n = self._length
        return self._keys[:, :, :n], self._values[:, :, :n]

    def positions(self):
        return self._positions[:, :, : self._length]

    def lengths(self):
        return torch.full(self._keys.shape[:2], self._length, dtype=torch.long)

    @property
    def length(self):
        return self._length

    @property
    def nbytes(self):
        return tensor_bytes(self._keys, self._values, self._positions)

    def parts(self):
        return (*self.read(), self.positions(), None)

    def rerotated(self, shift, config):
        keys, values = self.read()
        return DenseStore(rotated_by(keys, shift, config), values, self.positions(), self._length)

    def keep(self, idx, values=None):
        keys, old_values = self.read()
        gather_idx = idx.unsqueeze(-1).expand(-1, -1, -1, keys.size(3))  # (B, nh, k, hs)
        kept_values = old_values.gather(2, gather_idx) if values is None else values.to(keys.dtype).contiguous()
        return DenseStore(keys.gather(2, gather_idx), kept_values, self.positions().gather(2, idx), idx.size(-1))
