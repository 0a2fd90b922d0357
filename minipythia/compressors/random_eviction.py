from dataclasses import dataclass

import torch

from .base import Compressor


@dataclass
class RandomEviction(Compressor):
    """Random eviction, a floor for the other policies: keeps max_capacity_prompt = C entries per head,
    chosen uniformly at random (independently per batch row, head and layer), for prompts of L > C tokens.
    Nothing is protected, not even the last token or the first (sink) ones: it is pure random on purpose.
    Deterministic: the scores come from a torch.Generator seeded by (seed, layer). Prompts with L <= C stay whole.
    """

    name = "random"
    max_capacity_prompt: int = 512
    seed: int = 0

    def __post_init__(self):
        if self.max_capacity_prompt < 1:
            raise ValueError(f"max_capacity_prompt must be >= 1, got {self.max_capacity_prompt}")
        if self.seed < 0:
            raise ValueError(f"seed must be >= 0, got {self.seed}")

    def keep_count(self, layer, seq_len):
        return min(seq_len, self.max_capacity_prompt)

    def score(self, layer, keys, values, queries):
        # One stream per (seed, layer), distinct for any layer below a million.
        g = torch.Generator().manual_seed(self.seed * 1_000_000 + layer)
        return torch.rand(keys.shape[:3], generator=g).to(keys.device)  # (B, nh, L), drawn on CPU
