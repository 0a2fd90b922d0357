from dataclasses import dataclass

import torch

from .base import CapacityBudget, Compressor
from .registry import register


@register
@dataclass
class RandomEviction(CapacityBudget, Compressor):
    """Random eviction, a floor for the other policies: keeps max_capacity_prompt = C entries per head,
    chosen uniformly at random (independently per batch row, head and layer), for prompts of L > C tokens.
    Nothing is protected, not even the last token or the first (sink) ones: it is pure random on purpose.
    Deterministic: the scores come from a torch.Generator seeded by (seed, layer). Prompts with L <= C stay whole.
    """

    name = "random"
    rows_interact = True  # row b's draws are the stream's b-th (B, nh, L) block: batched, a row gets others
    max_capacity_prompt: int = 512
    seed: int = 0

    def validate(self):
        super().validate()
        if self.seed < 0:
            raise ValueError(f"seed must be >= 0, got {self.seed}")

    def decode_queries(self):
        return 0  # ranks entries by chance

    def score(self, layer, keys, values, queries):
        # One stream per (seed, layer), distinct for any layer below a million.
        g = torch.Generator().manual_seed(self.seed * 1_000_000 + layer)
        return torch.rand(keys.shape[:3], generator=g).to(keys.device)  # (B, nh, L), drawn on CPU
