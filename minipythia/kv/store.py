"""What one layer of the cache holds, behind one interface: its entries per (batch row, head), each a key (after
rotary), a value and the token's original position.

A store answers the attention's questions (`read`: keys and values (B, nh, n, hs) in the model's dtype, with
`padding` saying which of the n slots are entries when heads hold different numbers of them), takes the
tokens of each forward (`append`), and says what it really holds (`nbytes`, `lengths`). The cache replaces a
layer's store when it compresses it: the store of the kept entries is built from the one before (`keep`, or a
store kind's own constructor over it), so memory of evicted entries is released with the old store.

The kinds: `DenseStore` (every head the same entries count: the prefill's, and every uniform policy's),
`RaggedStore` (head-wise budgets: heads grouped by how many entries they kept, each group a store of its
own), `PrunedKeysStore` (the prompt's keys with only some channels, ThinK) and `QuantizedStore` (KIVI, a
wrapper over a store of any kind). Adding a kind is one file with a subclass of `Store`.
"""

from __future__ import annotations

from typing import Callable

import torch

# Decoding appends one token at a time; growing the buffers in chunks keeps that from copying every step.
GROWTH = 64


class Store:
    """One layer's entries. Shapes: B batch rows, nh heads, n slots, hs head size."""

    def append(self, k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor) -> None:
        """Stores k, v (B, nh, T, hs) of a forward's T tokens, at positions (T,), in every head alike."""
        raise NotImplementedError

    def read(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values (B, nh, n, hs) in the model's dtype, entries and padding slots alike."""
        raise NotImplementedError

    def positions(self) -> torch.Tensor:
        """Original token position of each slot, LongTensor (B, nh, n); -1 at padding."""
        raise NotImplementedError

    def padding(self) -> torch.Tensor | None:
        """BoolTensor (B, nh, n): which slots are entries; None when every one is."""
        return None

    def lengths(self) -> torch.Tensor:
        """Entries each head holds, LongTensor (B, nh)."""
        raise NotImplementedError

    @property
    def length(self) -> int:
        """Slots per head: n of read()."""
        raise NotImplementedError

    @property
    def nbytes(self) -> int:
        """Bytes its tensors really hold between forwards (allocated capacity and bookkeeping included)."""
        raise NotImplementedError

    def settle(self) -> None:
        """Called once a forward's attention has read the store (KIVI quantizes its full tails here)."""

    def parts(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """The entries as stored, for a kind that wraps this one (QuantizedStore): keys (B, nh, n, dk), values
        (B, nh, n, hs), positions (B, nh, n) and, when the keys hold only some channels, those channels'
        indices (B, nh, dk) (None: every channel)."""
        raise ValueError(f"a {type(self).__name__} cannot be wrapped")

    def keep(self, idx: torch.Tensor, values: torch.Tensor | None = None) -> "Store":
        """The store of only the entries at slots idx (B, nh, k) of every head (in that order), in freshly
        allocated tensors; with `values` (B, nh, k, hs), those are the kept entries' values (a policy that
        merges evicted entries into kept ones). Kinds that cannot lose entries raise ValueError."""
        raise ValueError(f"a {type(self).__name__} cannot evict entries")

    def rerotated(self, shift: torch.Tensor, config) -> "Store":
        """The store with each entry's key moved by shift (B, nh, n) rotary positions (StreamingLLM's positions in
        the cache); kinds whose keys are not held in full precision raise ValueError."""
        raise ValueError(f"a {type(self).__name__} cannot re-rotate its keys")

    def wrapped(self, wrap: Callable[["Store"], "Store"]) -> "Store":
        """wrap(self): a kind made of several stores (RaggedStore) wraps each of them instead."""
        return wrap(self)


def tensor_bytes(*tensors: torch.Tensor | None) -> int:
    """Bytes the tensors' storages hold (a view counts its whole storage: what is really allocated)."""
    return sum(t.untyped_storage().nbytes() for t in tensors if t is not None)


def extended(buffer: torch.Tensor | None, length: int, new: torch.Tensor | None, count: int | None = None
             ) -> tuple[torch.Tensor, int]:
    """A buffer (B, nh, capacity, ...) whose first `length` entries are in use, with room for `count` more
    (grown by GROWTH when it is full) and, when given, `new` (B, nh, count, ...) written after them.
    Returns the buffer (the same one when it had room) and the new length."""
    count = new.size(2) if new is not None else count
    if buffer.size(2) < length + count:
        grown = torch.empty(*buffer.shape[:2], length + count + GROWTH, *buffer.shape[3:], dtype=buffer.dtype,
                            device=buffer.device)
        grown[:, :, :length] = buffer[:, :, :length]
        buffer = grown
    if new is not None:
        buffer[:, :, length : length + count] = new
    return buffer, length + count
