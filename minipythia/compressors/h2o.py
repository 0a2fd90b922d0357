import math
from dataclasses import dataclass

import torch

from .base import Compressor

# Queries scored at once: a (B, nh, QUERY_CHUNK, L) float32 block instead of the whole (B, nh, L, L) matrix.
QUERY_CHUNK = 256


@dataclass
class H2O(Compressor):
    """H2O, Heavy-Hitter Oracle (Zhang et al. 2023, "H2O: Heavy-Hitter Oracle for Efficient Generative
    Inference of Large Language Models"), applied once at the end of the prefill.

    Per layer and head, of a prompt of L > C = max_capacity_prompt tokens, keeps:
    - the `int(C * recent_ratio)` most recent tokens, always;
    - the other C - int(C * recent_ratio) entries with the most accumulated attention: the sum, over all L
      prompt queries, of the causal softmax attention (float32) each key received (a column sum of the
      attention matrix; earlier keys are seen by more queries, as in H2O).
    recent_ratio = 0.5 is the paper's even heavy/recent split. Prompts with L <= C stay whole.

    `queries` may be only the last Q <= L ones, those of the last Q entries, and the sum then runs over them:
    during decoding (KVCache decode_interval) they are the newest tokens' (minipythia.cache.decode_query_window).
    """

    name = "h2o"
    max_capacity_prompt: int = 512
    recent_ratio: float = 0.5

    def __post_init__(self):
        if self.max_capacity_prompt < 1:
            raise ValueError(f"max_capacity_prompt must be >= 1, got {self.max_capacity_prompt}")
        if not 0.0 <= self.recent_ratio <= 1.0:
            raise ValueError(f"recent_ratio must be in [0, 1] (share of the budget kept for recent tokens), "
                             f"got {self.recent_ratio}")

    @property
    def n_recent(self) -> int:
        return int(self.max_capacity_prompt * self.recent_ratio)

    def keep_count(self, layer, seq_len):
        return min(seq_len, self.max_capacity_prompt)

    def score(self, layer, keys, values, queries):
        B, H, L, hs = keys.shape
        offset = L - queries.size(2)  # query i belongs to entry offset + i (offset 0 at the prefill)
        keys = keys.float()
        received = keys.new_zeros(B, H, L)
        for start in range(offset, L, QUERY_CHUNK):
            end = min(start + QUERY_CHUNK, L)
            q = queries[:, :, start - offset : end - offset].float()  # (B, nh, T, hs)
            # Queries start..end-1 see keys 0..end-1 at most: later keys would only be masked out.
            logits = q @ keys[:, :, :end].transpose(-1, -2) / math.sqrt(hs)  # (B, nh, T, end)
            visible = torch.arange(end, device=keys.device) <= torch.arange(start, end, device=keys.device)[:, None]
            attn = logits.masked_fill(~visible, float("-inf")).softmax(dim=-1)
            received[..., :end] += attn.sum(dim=-2)  # (B, nh, end)
        received[..., L - self.n_recent :] = float("inf")  # the recent tokens are always kept
        return received
