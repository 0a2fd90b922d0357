"""The prompt's keys with only the channels a policy keeps (ThinK, Xu et al. 2024): for a policy whose
`key_channels()` names, per head, the channels of the prompt's kept keys to keep.

Built over a layer's kept entries at the end of the prefill: the keys are cut to their kept channels,
(B, nh, k, d') with the channels' indices (B, nh, d'), and the full-width ones are let go. Keys of later
tokens are stored whole (ThinK prunes the prompt's), values are untouched. Attention reads the pruned keys with
zeros in their dropped channels (so q . k sums over the kept channels only, what pruning means), followed by
the later ones; that full-width tensor exists during a forward only.
"""

from __future__ import annotations

import torch

from .dense import DenseStore
from .store import Store, tensor_bytes


def widened(keys: torch.Tensor, channels: torch.Tensor, head_size: int) -> torch.Tensor:
    """keys (B, nh, k, d') of channels (B, nh, d') -> (B, nh, k, head_size), zeros in the other channels."""
    B, H, k, _ = keys.shape
    full = keys.new_zeros(B, H, k, head_size)
    return full.scatter_(3, channels[:, :, None, :].expand(-1, -1, k, -1), keys)


class PrunedKeysStore(Store):
    def __init__(self, store: Store, channels: torch.Tensor):
        """The entries of `store` (uniform: every head the same count), keys cut to channels (B, nh, d')."""
        keys, values, positions, already = store.parts()
        if already is not None:
            raise ValueError("the keys are pruned already")
        self.head_size = keys.size(3)
        self.channels = channels
        self._keys = keys.gather(3, channels[:, :, None, :].expand(-1, -1, keys.size(2), -1))  # (B, nh, k, d')
        self._values, self._positions = values, positions  # the prompt's
        self._later = DenseStore.empty(*keys.shape[:2], self.head_size, keys.dtype, keys.device)

    def append(self, k, v, positions):
        self._later.append(k, v, positions)

    def read(self):
        later_keys, later_values = self._later.read()
        return (torch.cat((widened(self._keys, self.channels, self.head_size), later_keys), dim=2),
                torch.cat((self._values, later_values), dim=2))

    def positions(self):
        return torch.cat((self._positions, self._later.positions()), dim=2)

    def lengths(self):
        return torch.full(self._keys.shape[:2], self.length, dtype=torch.long)

    @property
    def length(self):
        return self._keys.size(2) + self._later.length

    @property
    def nbytes(self):
        return tensor_bytes(self._keys, self.channels, self._values, self._positions) + self._later.nbytes

    def parts(self):
        if self._later.length:
            raise ValueError("a pruned-keys store is wrapped before any later token")
        return self._keys, self._values, self._positions, self.channels
