from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F

from .base import CapacityBudget, Compressor, attention_weights
from .registry import register


@register
@dataclass
class SnapKV(CapacityBudget, Compressor):
    """SnapKV (Li et al. 2024), as in FasterDecoding/SnapKV `snapkv_utils.py`.

    The last `window_size` prompt queries vote (softmax attention, summed over the window) for the
    earlier keys; votes are pooled along the sequence; the top max_capacity_prompt - window_size
    earlier entries are kept per head, plus the window itself. Prompts shorter than the capacity stay whole.
    """

    name = "snapkv"
    label_names = {"window_size": "w", "kernel_size": "k", "pooling": ""}
    window_size: int = 32
    max_capacity_prompt: int = 512
    kernel_size: int = 5
    pooling: Literal["avgpool", "maxpool"] = "avgpool"

    def validate(self):
        if self.window_size < 1:
            raise ValueError(f"window_size must be >= 1, got {self.window_size}")
        if self.window_size >= self.max_capacity_prompt:
            raise ValueError(f"window_size ({self.window_size}) must be smaller than max_capacity_prompt "
                             f"({self.max_capacity_prompt})")
        if self.kernel_size < 1 or self.kernel_size % 2 == 0:
            raise ValueError(f"kernel_size must be a positive odd number, got {self.kernel_size}")
        super().validate()

    def decode_queries(self):
        return self.window_size  # the window votes, and is always kept

    def score(self, layer, keys, values, queries):
        W, L = self.window_size, keys.size(2)
        attn = attention_weights(queries[:, :, -W:], keys)  # (B, nh, W, L), causal inside the window
        votes = attn[..., : L - W].sum(dim=-2)  # (B, nh, L-W)
        pool = F.avg_pool1d if self.pooling == "avgpool" else F.max_pool1d
        pooled = pool(votes, kernel_size=self.kernel_size, stride=1, padding=self.kernel_size // 2)
        window = pooled.new_full((*pooled.shape[:-1], W), float("inf"))  # the window is always kept
        return torch.cat((pooled, window), dim=-1)  # (B, nh, L)
