import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .base import Compressor


@dataclass
class SnapKV(Compressor):
    """SnapKV (Li et al. 2024), as in FasterDecoding/SnapKV `snapkv_utils.py`.

    The last `window_size` prompt queries vote (softmax attention, summed over the window) for the
    earlier keys; votes are pooled along the sequence; the top max_capacity_prompt - window_size
    earlier entries are kept per head, plus the window itself. Prompts shorter than the capacity stay whole.
    """

    name = "snapkv"
    window_size: int = 32
    max_capacity_prompt: int = 512
    kernel_size: int = 5
    pooling: str = "avgpool"

    def __post_init__(self):
        if self.window_size < 1:
            raise ValueError(f"window_size must be >= 1, got {self.window_size}")
        if self.window_size >= self.max_capacity_prompt:
            raise ValueError(f"window_size ({self.window_size}) must be smaller than max_capacity_prompt "
                             f"({self.max_capacity_prompt})")
        if self.kernel_size < 1 or self.kernel_size % 2 == 0:
            raise ValueError(f"kernel_size must be a positive odd number, got {self.kernel_size}")
        if self.pooling not in ("avgpool", "maxpool"):
            raise ValueError(f"pooling must be 'avgpool' or 'maxpool', got {self.pooling!r}")

    def keep_count(self, layer, seq_len):
        return seq_len if seq_len < self.max_capacity_prompt else self.max_capacity_prompt

    def score(self, layer, keys, values, queries):
        W, L, hs = self.window_size, keys.size(2), keys.size(3)
        window_q = queries[:, :, -W:].float()  # (B, nh, W, hs)
        logits = window_q @ keys.float().transpose(-1, -2) / math.sqrt(hs)  # (B, nh, W, L)
        # Window query i sits at position L-W+i and sees keys up to there (causal inside the window).
        visible = torch.arange(L, device=keys.device) <= torch.arange(L - W, L, device=keys.device)[:, None]
        attn = logits.masked_fill(~visible, float("-inf")).softmax(dim=-1)
        votes = attn[..., : L - W].sum(dim=-2)  # (B, nh, L-W)
        pool = F.avg_pool1d if self.pooling == "avgpool" else F.max_pool1d
        pooled = pool(votes, kernel_size=self.kernel_size, stride=1, padding=self.kernel_size // 2)
        window = pooled.new_full((*pooled.shape[:-1], W), float("inf"))  # the window is always kept
        return torch.cat((pooled, window), dim=-1)  # (B, nh, L)
