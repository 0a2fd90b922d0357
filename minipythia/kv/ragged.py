"""Heads of a layer that keep different numbers of entries, each holding only its own: for head-wise budgets
(a policy whose `select` returns a mask, AdaKV and the like).

The prompt's kept entries: the (batch row, head) pairs that kept the same number of them form a group, and each
group is a store of its own over those rows (a DenseStore, or any store wrapped around one: quantized, say).
Later tokens join every head alike, so they go to one store shared by the whole layer, the tail (wrapped like
the groups). Attention reads the layer padded to its longest head, (B, nh, n_max + t, hs): each head's prompt
entries first, then padding up to n_max, then the t later tokens; `padding()` says which slots are entries.
That padded tensor exists during a forward only; `nbytes` is what the groups and the tail hold. A decode step
costs one copy per group into it, and the tail's append.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .dense import DenseStore
from .store import Store, tensor_bytes


@dataclass
class Group:
    rows: torch.Tensor  # LongTensor (R,): which (batch row * nh + head) pairs, flattened
    kept: int  # the prompt entries each of them kept
    store: Store  # (1, R, kept, hs)


class RaggedStore(Store):
    def __init__(self, groups: list[Group], kept: torch.Tensor, tail: Store):
        self.groups = groups
        self._kept = kept  # (B, nh) the prompt entries each head kept
        self.tail = tail  # (B, nh, t, hs) the later tokens

    @classmethod
    def of(cls, store: Store, mask: torch.Tensor) -> "RaggedStore":
        """The entries of `store` that mask (B, nh, L) keeps, each head its own number of them."""
        keys, values = store.read()
        B, H, L, D = keys.shape
        flat_mask = mask.reshape(B * H, L)
        flat = (keys.reshape(B * H, L, D), values.reshape(B * H, L, D), store.positions().reshape(B * H, L))
        counts = flat_mask.sum(dim=-1)
        groups = []
        for kept in counts.unique().tolist():
            rows = (counts == kept).nonzero().squeeze(1)
            chosen = flat_mask[rows]  # (R, L)
            k, v, p = (x[rows][chosen].view(1, rows.numel(), kept, *x.shape[2:]) for x in flat)
            groups.append(Group(rows, kept, DenseStore(k, v, p, kept)))
        return cls(groups, counts.view(B, H), DenseStore.empty(B, H, D, keys.dtype, keys.device))

    def wrapped(self, wrap):
        for group in self.groups:
            group.store = group.store.wrapped(wrap)
        self.tail = self.tail.wrapped(wrap)
        return self

    def _longest(self) -> int:
        return max(group.kept for group in self.groups)

    def append(self, k, v, positions):
        self.tail.append(k, v, positions)

    def settle(self):
        self.tail.settle()

    def _laid_out(self, parts, tail: torch.Tensor, fill) -> torch.Tensor:
        """One tensor (B, nh, n_max + t, ...) from each group's prompt entries (1, R, kept, ...), `fill` up to
        n_max, then the tail's (B, nh, t, ...)."""
        B, H = self._kept.shape
        n_max, t = self._longest(), tail.size(2)
        out = tail.new_full((B * H, n_max + t, *tail.shape[3:]), fill)
        for group, part in zip(self.groups, parts):
            out[group.rows, : group.kept] = part[0]
        out = out.view(B, H, n_max + t, *tail.shape[3:])
        out[:, :, n_max:] = tail
        return out

    def read(self):
        reads = [group.store.read() for group in self.groups]
        tail_keys, tail_values = self.tail.read()
        return (self._laid_out([k for k, _ in reads], tail_keys, 0.0),
                self._laid_out([v for _, v in reads], tail_values, 0.0))

    def positions(self):
        return self._laid_out([group.store.positions() for group in self.groups], self.tail.positions(), -1)

    def padding(self):
        n_max = self._longest()
        slot = torch.arange(n_max + self.tail.length, device=self._kept.device)
        return (slot < self._kept[..., None]) | (slot >= n_max)  # (B, nh, n_max + t)

    def lengths(self):
        return self._kept + self.tail.length

    @property
    def length(self):
        return self._longest() + self.tail.length

    @property
    def nbytes(self):
        groups = sum(group.store.nbytes + tensor_bytes(group.rows) for group in self.groups)
        return tensor_bytes(self._kept) + groups + self.tail.nbytes
