"""Heads of a layer that keep different numbers of entries, each holding only its own: for head-wise budgets
(a policy whose `select` returns a mask, AdaKV and the like).

The (batch row, head) pairs that kept the same number of entries form a group, and each group is a store of
its own over those rows (a DenseStore, or any store wrapped around one: quantized, say), so a ragged layer
composes with every other kind. Later tokens are appended to every group alike. Attention reads the layer
padded to its longest head, (B, nh, n_max + t, hs): each head's kept prompt entries first, then padding up to
n_max, then the t later tokens; `padding()` says which slots are entries. That padded tensor exists during a
forward only; `nbytes` is what the groups hold.
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
    store: Store  # (1, R, kept + t, hs)


class RaggedStore(Store):
    def __init__(self, batch_size: int, n_heads: int, groups: list[Group], kept: torch.Tensor):
        self.batch_size, self.n_heads, self.groups = batch_size, n_heads, groups
        self._kept = kept  # (B * nh,) the prompt entries each head kept
        self._appended = 0  # tokens appended since the selection, in every group

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
        return cls(B, H, groups, counts)

    def wrapped(self, wrap):
        for group in self.groups:
            group.store = group.store.wrapped(wrap)
        return self

    def _longest(self) -> int:
        return max(group.kept for group in self.groups)

    def append(self, k, v, positions):
        B, H, T, D = k.shape
        k, v = k.reshape(B * H, T, D), v.reshape(B * H, T, D)
        for group in self.groups:
            group.store.append(k[group.rows][None], v[group.rows][None], positions)
        self._appended += T

    def _laid_out(self, parts, fill) -> torch.Tensor:
        """One tensor (B, nh, n_max + t, ...) from each group's (1, R, kept + t, ...): its kept entries first,
        `fill` up to n_max, then the t later tokens."""
        n_max, t = self._longest(), self._appended
        first = parts[0]
        out = first.new_full((self.batch_size * self.n_heads, n_max + t, *first.shape[3:]), fill)
        for group, part in zip(self.groups, parts):
            out[group.rows, : group.kept] = part[0, :, : group.kept]
            out[group.rows, n_max:] = part[0, :, group.kept :]
        return out.view(self.batch_size, self.n_heads, n_max + t, *first.shape[3:])

    def read(self):
        reads = [group.store.read() for group in self.groups]
        return self._laid_out([k for k, _ in reads], 0.0), self._laid_out([v for _, v in reads], 0.0)

    def positions(self):
        return self._laid_out([group.store.positions() for group in self.groups], -1)

    def padding(self):
        n_max = self._longest()
        slot = torch.arange(n_max + self._appended, device=self._kept.device)
        padding = (slot < self._kept[:, None]) | (slot >= n_max)  # (B * nh, n_max + t)
        return padding.view(self.batch_size, self.n_heads, -1)

    def lengths(self):
        return self._kept.view(self.batch_size, self.n_heads) + self._appended

    @property
    def length(self):
        return self._longest() + self._appended

    @property
    def nbytes(self):
        return tensor_bytes(self._kept) + sum(group.store.nbytes + tensor_bytes(group.rows) for group in self.groups)
