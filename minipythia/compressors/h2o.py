from dataclasses import dataclass

from .base import QUERY_CHUNK, CapacityBudget, Compressor, attention_weights
from .registry import register


@register
@dataclass
class H2O(CapacityBudget, Compressor):
    """H2O, Heavy-Hitter Oracle (Zhang et al. 2023, "H2O: Heavy-Hitter Oracle for Efficient Generative
    Inference of Large Language Models").

    Per layer and head, of a prompt of L > C = max_capacity_prompt tokens, keeps:
    - the `int(C * recent_ratio)` most recent tokens, always;
    - the other C - int(C * recent_ratio) entries with the most accumulated attention: the sum, over all L
      prompt queries, of the causal softmax attention (float32) each key received (a column sum of the
      attention matrix; earlier keys are seen by more queries, as in H2O).
    recent_ratio = 0.5 is the paper's even heavy/recent split. Prompts with L <= C stay whole.

    During decoding (KVCache decode_interval) the queries are the `n_recent` newest tokens' (at least one):
    a windowed H2O, whose heavy hitters are the entries those tokens attended to most, since the cache
    carries no scores across compressions.
    """

    name = "h2o"
    label_names = {"recent_ratio": "recent"}
    max_capacity_prompt: int = 512
    recent_ratio: float = 0.5

    def validate(self):
        super().validate()
        if not 0.0 <= self.recent_ratio <= 1.0:
            raise ValueError(f"recent_ratio must be in [0, 1] (share of the budget kept for recent tokens), "
                             f"got {self.recent_ratio}")

    @property
    def n_recent(self) -> int:
        return int(self.max_capacity_prompt * self.recent_ratio)

    def decode_queries(self):
        return max(1, self.n_recent)

    def score(self, layer, keys, values, queries):
        B, H, L, hs = keys.shape
        offset = L - queries.size(2)  # query i belongs to entry offset + i (offset 0 at the prefill)
        keys = keys.float()
        received = keys.new_zeros(B, H, L)
        for start in range(offset, L, QUERY_CHUNK):
            end = min(start + QUERY_CHUNK, L)
            # Queries start..end-1 are the last of keys 0..end-1, and see no later key.
            attn = attention_weights(queries[:, :, start - offset : end - offset], keys[:, :, :end])
            received[..., :end].add_(attn.sum(dim=-2))  # (B, nh, end); add_, as `+=` on a slice copies it back
        received[..., L - self.n_recent :] = float("inf")  # the recent tokens are always kept
        return received
