"""Targets scored through every compressor's cache of one prefill: the step every task shares.

A prompt is prefilled once (Prefill.record, full KV); each compressor's cache is replayed from it, one alive
at a time, and the targets are teacher-forced through it in one forward. The first target is predicted by
the prefill's last logits, which saw the full KV whatever the compressor (as generation's first token).
B prompts of one length with B rows of targets of one length are scored the same way, as one batch: the
caches keep each row's entries apart, so each row is compressed as it would be alone; a policy whose rows
would depend on each other in one cache (its draws laid out by row, Compressor.rows_interact, or heads padded to
the batch's longest, Compressor.headwise_at) is replayed one row at a time.
Kept entries are copies of the one prefill's, so caches that kept the same positions (and hold copies of them,
KVCache.holds_copies) are the same cache and give the same logits: those are measured once (a budget at or above the prompt keeps
everything, as none does, and so gives exactly none's figures).
The targets are the tokens that follow the prompt: a compressor that sees the future (the oracle) is given their
queries (Compressor.see_future) before its replay.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, TypeVar

import torch

from minipythia import Compressor, Prefill, oracle_future_queries
from minipythia.timing import clock

Result = TypeVar("Result")


@dataclass
class Kept:
    """What a replayed cache of one prefill holds: its entries' positions per layer and, for a cache that holds
    other than plain copies of them (quantized, pruned, merged, laid out per head: KVCache.holds_copies), its
    compressor's label, since caches of the same positions then hold other entries."""
    positions: list[torch.Tensor]
    altered_by: str | None

    @classmethod
    def of(cls, cache) -> "Kept":
        return cls([cache.positions(layer) for layer in range(cache.num_layers)],
                   None if cache.holds_copies else cache.compressor.label)

    def per_head(self) -> torch.Tensor:
        """Entries each head holds, summed over the batch rows: (layers, nh) float64 (padding is position -1).
        A sum of counts, exact, so that prompts scored in batches of any size add up to the same figures."""
        return torch.stack([(p >= 0).sum((0, -1)).double() for p in self.positions]).cpu()

    def same(self, other: "Kept") -> bool:
        """Whether two caches of one prefill hold the same entries in every layer, head and batch row."""
        return self.altered_by == other.altered_by and all(
            x.shape == y.shape and torch.equal(x, y) for x, y in zip(self.positions, other.positions))


def forced_logits(model, prefill: Prefill, cache, targets: torch.Tensor) -> torch.Tensor:
    """Logits (B, T, V) in float32 predicting each of targets (B, T) after the prefill of B prompts, through
    `cache` (which the forward extends by T - 1 entries)."""
    first = prefill.logits[:, -1:].float()
    if targets.size(1) == 1:
        return first
    return torch.cat((first, model(targets[:, :-1], cache=cache).float()), dim=1)


class Future:
    """The tokens that follow a prefill's prompts (B, F), for replays of it: a compressor that sees the future
    (Compressor.see_future) is given their queries, computed once, for its replay alone."""

    def __init__(self, model, prefill: Prefill, tokens: torch.Tensor):
        self.model, self.prefill, self.tokens = model, prefill, tokens
        self._queries = None

    def queries(self, row: int | None) -> dict[int, torch.Tensor]:
        if self._queries is None:
            self._queries = oracle_future_queries(self.model, self.prefill.input_ids, self.tokens)
        return self._queries if row is None else {layer: q[row : row + 1] for layer, q in self._queries.items()}

    def replay(self, compressor: Compressor | None, row: int | None = None):
        """The cache of the prefill (of batch row `row` alone) replayed with the compressor."""
        prefill = self.prefill if row is None else self.prefill.row(row)
        if compressor is None or not compressor.sees_future:
            return prefill.replay(self.model, compressor)
        compressor.see_future(self.queries(row))
        try:
            return prefill.replay(self.model, compressor)
        finally:
            compressor.see_future({})  # this prompt's future is no other's


@torch.inference_mode()
def score_replays(model, prefill: Prefill, compressors: list[Compressor | None], targets: torch.Tensor,
                  measure: Callable[[torch.Tensor], Result], seconds: list[float] | None = None,
                  per_head: list | None = None) -> list[Result]:
    """measure(logits (B, T, V) float32) of the targets (B, T) through each compressor's cache of the prefill
    of B prompts, in order; computed once per distinct set of kept entries (in every row). With `seconds`,
    each compressor's own time (replay, forward, measure) is added to its entry; with `per_head`, each
    head-wise compressor's entries per head, summed over the B rows (Kept.per_head), are added to its entry
    (None until the first)."""
    device = model.embed_in.weight.device
    results: list[Result] = []
    measured: list[tuple[Kept, Result]] = []
    future = Future(model, prefill, targets)
    for i, compressor in enumerate(compressors):
        t = clock(device)
        by_row = targets.size(0) > 1 and compressor is not None and (compressor.rows_interact or any(
            map(compressor.headwise_at, range(model.config.num_hidden_layers))))
        if by_row:
            # Its rows would depend on each other in one cache: each row alone, as a batch of one would be.
            headwise, logits, heads = False, [], 0
            for b in range(targets.size(0)):
                row = prefill.row(b)
                cache = future.replay(compressor, row=b)
                headwise = cache.headwise
                heads = heads + Kept.of(cache).per_head()
                logits.append(forced_logits(model, row, cache, targets[b : b + 1]))
                del cache
            if per_head is not None and headwise:
                per_head[i] = heads + (0 if per_head[i] is None else per_head[i])
            results.append(measure(torch.cat(logits)))
        else:
            cache = future.replay(compressor)
            kept = Kept.of(cache)
            if per_head is not None and cache.headwise:
                per_head[i] = kept.per_head() + (0 if per_head[i] is None else per_head[i])
            result = next((r for other, r in measured if other.same(kept)), None)
            if result is None:
                result = measure(forced_logits(model, prefill, cache, targets))
                measured.append((kept, result))
            results.append(result)
            del cache  # one replayed cache alive at a time
        if seconds is not None:
            seconds[i] += clock(device) - t
    return results
