from dataclasses import dataclass

import torch

from .base import CapacityBudget, Compressor
from .over_scorer import OverScorer
from .registry import register
from .settings import Policy


@register
@dataclass
class ThinK(OverScorer, CapacityBudget, Compressor):
    """ThinK (Xu et al. 2024, "ThinK: Thinner Key Cache by Query-Driven Pruning"), as in the official
    SalesforceAIResearch/ThinK (`ThinK_eager/src/kv_pruning_utils.py`, key_pruner_query_driven) and NVIDIA
    kvpress (`kvpress/presses/think_press.py`, ThinKPress, composed after an eviction press).

    Prunes key channels rather than entries. The entries are first evicted by another policy, the
    `scorer` ("none": no eviction, channel pruning alone); then, per (batch, head), each channel c of the
    kept keys K is scored with the last `window_size` prompt queries Q_w, both after rotary:

        score(c) = mean_i Q_w[i, c]^2 * mean_j K[j, c]^2

    which is the paper's ||Q_w[:, c] K[:, c]^T||_F^2 = ||Q_w[:, c]||^2 ||K[:, c]||^2 divided by the same
    constant for every channel of a head (so it ranks them alike). The int(hs * ratio) lowest-scoring
    channels are pruned (ratio = key_channel_compression_ratio) and the other hs - int(hs * ratio) kept.
    The cache (minipythia.pruned_keys_cache) stores only the kept channels of the prompt's kept keys, so
    q . k sums over those; keys of later tokens are stored whole, values untouched.
    Channels are chosen once, at the prefill: ThinK cannot compress during decoding.

    Deviations: the official ThinK leaves the last 32 kept prompt keys (its recent_size) whole and always
    scores with the last 32 queries; here, as in kvpress, every kept prompt key is pruned and the window is
    window_size. kvpress zeroes the pruned channels; here they are dropped (the same attention, less memory).

    The scorer is built by OverScorer: its defaults, plus max_capacity_prompt when it has that
    setting (so max_capacity_prompt does nothing for a scorer without one, e.g. knorm or none). It is
    `inner`; how many entries are kept and which (keep_count, score, kept_values), the model's config and
    the missing input are the scorer's.
    """

    name = "think"
    label_names = {"scorer": "", "key_channel_compression_ratio": "kc", "window_size": "kw"}
    cannot_decode = ("it chooses each head's key channels once, at the prefill, and stores the prompt's keys "
                     "with those channels only")
    prunes_key_channels = True
    max_capacity_prompt: int = 512
    scorer: Policy = "snapkv"
    key_channel_compression_ratio: float = 0.5  # the fraction of channels pruned (kvpress's name; its default is 0)
    window_size: int = 32

    def validate(self):
        super().validate()
        if not 0.0 <= self.key_channel_compression_ratio < 1.0:
            raise ValueError(f"key_channel_compression_ratio must be in [0, 1) (fraction of key channels pruned), "
                             f"got {self.key_channel_compression_ratio}")
        if self.window_size < 1:
            raise ValueError(f"window_size must be >= 1, got {self.window_size}")

    carries = frozenset({"sets_values"})  # (kept_values delegates to the scorer)
    needs_scores = False  # scorer none: channel pruning alone

    def pruned_channels(self, head_size: int) -> int:
        """How many channels of a head are pruned: int(head_size * key_channel_compression_ratio), as the
        official code and kvpress (so hs - that many are kept, at least one)."""
        return int(head_size * self.key_channel_compression_ratio)

    def keep_count(self, layer, seq_len):
        return self.inner.keep_count(layer, seq_len)

    def score(self, layer, keys, values, queries):
        return self.inner.score(layer, keys, values, queries)

    def kept_values(self, layer, keys, values, queries, idx):
        return self.inner.kept_values(layer, keys, values, queries, idx)

    def key_channels(self, layer, keys, queries):
        B, H, _, hs = keys.shape
        q = queries[:, :, -self.window_size :].float()  # the window's queries, after rotary
        scores = q.square().mean(dim=2) * keys.float().square().mean(dim=2)  # (B, nh, hs)
        pruned = scores.topk(self.pruned_channels(hs), dim=-1, largest=False).indices
        kept = torch.ones_like(scores, dtype=torch.bool).scatter_(-1, pruned, False)
        channels = torch.arange(hs, device=keys.device).expand(B, H, hs)
        return channels[kept].view(B, H, -1)  # ascending: the mask keeps the channels' order
