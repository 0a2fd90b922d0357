from dataclasses import dataclass

import torch

from .base import CapacityBudget, Compressor
from .registry import register


@register
@dataclass
class LagKV(CapacityBudget, Compressor):
    """LagKV (Liang et al. 2025, "LagKV: Lag-Relative Information of the KV Cache Tells Which Tokens Are
    Important"), as in NVIDIA kvpress `kvpress/presses/lagkv_press.py`, LagKVPress.

    After the first `n_sink` entries (always kept), the prompt is cut into partitions of `lag_size`; the
    last whole partition, with the fewer than lag_size entries after it, is always kept too. Each earlier
    partition is judged against the next one: its keys are min-max normalised per channel by the next
    partition's range, the spread (std over channels) of each normalised key goes through a softmax over
    the partition, and likewise the values; the two are averaged. Within each partition the entries are
    ranked by that score, and the budget goes by rank, evenly over the partitions: each keeps its best
    r entries and, when the budget does not divide, some keep r + 1. Prompts with L <= max_capacity_prompt
    stay whole; so does any prompt too short for two partitions after the sinks, which the capacity rule
    below always fits (score() still gives it kvpress's fallback order: the sinks, then the most recent).

    Deviations, deliberate: kvpress keeps int(L * (1 - compression_ratio)) entries; here a fixed capacity,
    which must hold the sinks and the longest kept tail (n_sink + 2 * lag_size - 1 entries), since kvpress
    would otherwise drop an arbitrary part of them. Where kvpress leaves equal ranks of different partitions
    to top-k's arbitrary order, the later partition's entry is kept first. A channel constant over the next
    partition contributes 0 to the normalised entries (kvpress: 0 / 0, NaN scores for the whole partition and
    an arbitrary selection; see lag_relative_spread). Scores are computed in float32
    whatever the cache's dtype. kvpress's experimental `cross_scoring` (raw scores compared across
    partitions, meant for its head-adaptive AdaKV) is not offered. The paper's own cache keeps a fraction of
    each partition as decoding fills it (sink 16, lag 1024 by default); the defaults here are kvpress's.
    """

    name = "lagkv"
    label_names = {"n_sink": "sink", "lag_size": "lag"}
    cannot_decode = ("it ranks runs of lag_size consecutive tokens against the run after them, and the entries of a "
                     "cache it has compressed are no longer such runs; kvpress applies it to the prompt only, and "
                     "the paper's cache compresses each partition once, never rescoring what it kept")
    max_capacity_prompt: int = 512
    n_sink: int = 4
    lag_size: int = 128

    def validate(self):
        super().validate()
        if self.n_sink < 0:
            raise ValueError(f"n_sink must be >= 0, got {self.n_sink}")
        if self.lag_size < 2:
            raise ValueError(f"lag_size must be >= 2 (a one-entry partition has no range to normalise by), "
                             f"got {self.lag_size}")
        always = self.n_sink + 2 * self.lag_size - 1
        if self.max_capacity_prompt < always:
            raise ValueError(f"max_capacity_prompt ({self.max_capacity_prompt}) must be >= n_sink + 2 * lag_size - 1 "
                             f"= {always}: the sinks and the kept tail (up to 2 * lag_size - 1 entries) must fit; "
                             f"lower lag_size or raise the capacity")

    def score(self, layer, keys, values, queries):
        B, H, L, D = keys.shape
        S, lag = self.n_sink, self.lag_size
        scores = torch.full((B, H, L), float("inf"), device=keys.device)  # sinks and tail: always kept
        if L < S + 2 * lag:  # no partition has a successor: kvpress ranks the non-sinks by recency
            scores[..., S:] = torch.arange(max(0, L - S), device=keys.device, dtype=torch.float32)
            return scores
        P = (L - S) // lag  # whole partitions; the last one, with the leftovers after it, is the tail
        k = keys[:, :, S : S + P * lag].float().reshape(B, H, P, lag, D)
        v = values[:, :, S : S + P * lag].float().reshape(B, H, P, lag, D)
        score = (lag_relative_spread(k) + lag_relative_spread(v)) / 2  # (B, H, P - 1, lag)
        rank = score.argsort(dim=-1, stable=True).argsort(dim=-1)  # 0 = worst of its partition
        # kvpress scores rank / lag_size, equal across partitions at the same rank; rank * (P - 1) + partition
        # keeps its order and breaks those ties toward later partitions. Integers below L: exact in float32.
        partition = torch.arange(P - 1, device=keys.device)[:, None]
        scores[..., S : S + (P - 1) * lag] = (rank * (P - 1) + partition).reshape(B, H, -1).float()
        return scores


def lag_relative_spread(x: torch.Tensor) -> torch.Tensor:
    """x (B, H, P, lag, D), P partitions -> (B, H, P - 1, lag): for each entry of partitions 0 .. P-2, the
    std over channels of the entry min-max normalised by the next partition's per-channel range, softmaxed
    over its partition. A channel constant over the next partition (a dead key channel, repeated tokens) has
    no range to normalise by: it contributes 0 to every entry, where kvpress divides by zero and the NaN
    spreads over the whole partition (its top-k is then arbitrary)."""
    reference = x[:, :, 1:]
    low, high = reference.amin(dim=3, keepdim=True), reference.amax(dim=3, keepdim=True)
    constant = high == low
    # In place on the one fresh block (x[:, :, :-1] - low): the same operations, one (..., lag, D) block, not three.
    normalised = (x[:, :, :-1] - low).div_((high - low).masked_fill_(constant, 1.0))
    return normalised.masked_fill_(constant, 0.0).std(dim=-1).softmax(dim=-1)
