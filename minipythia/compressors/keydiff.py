from dataclasses import dataclass

import torch.nn.functional as F

from .base import CapacityBudget, Compressor
from .registry import register


@register
@dataclass
class KeyDiff(CapacityBudget, Compressor):
    """KeyDiff (Park et al. 2025, "KeyDiff: Key Similarity-Based KV Cache Eviction for Long-Context LLM
    Inference in Resource-Constrained Environments"), as in NVIDIA kvpress `kvpress/presses/keydiff_press.py`.

    Per (batch, head), the anchor is the mean of the layer's unit-normalised keys; each entry scores minus
    the cosine similarity of its key to the anchor, so the max_capacity_prompt keys least like the average
    key are kept. Nothing is protected (no sinks, no recent window), as in kvpress. It reads neither
    queries nor values. Prompts with L <= max_capacity_prompt stay whole.

    Budget: kvpress's KeyDiffPress keeps int(L * (1 - compression_ratio)) entries; here, as the other
    policies, a fixed capacity. During decoding (decode_interval N) the cache rescores what it holds, with
    the anchor of those entries, whenever N new ones have come: that is the paper's block-wise eviction
    with blocks of N tokens (kvpress: BlockPress / DecodingPress around KeyDiffPress).
    """

    name = "keydiff"
    max_capacity_prompt: int = 512

    def decode_queries(self):
        return 0  # scores keys only

    def score(self, layer, keys, values, queries):
        unit = F.normalize(keys.float(), dim=-1)  # (B, nh, L, hs)
        # The anchor's length does not matter to a cosine: normalise it, and the dot product is the cosine.
        anchor = F.normalize(unit.mean(dim=2, keepdim=True), dim=-1)  # (B, nh, 1, hs)
        return -(unit * anchor).sum(dim=-1)
