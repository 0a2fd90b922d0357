import math
from dataclasses import dataclass

from .base import Compressor


@dataclass
class TOVA(Compressor):
    """TOVA, Token Omission Via Attention (Oren et al. 2024, "Transformers are Multi-State RNNs"),
    applied once at the end of the prefill.

    Scores each prompt key by the softmax attention (float32) the LAST prompt query gives it, averaged over
    the heads of the layer, and keeps the top max_capacity_prompt = C: as in TOVA, every head of a layer
    keeps the same tokens. Prompts with L <= C stay whole.
    """

    name = "tova"
    max_capacity_prompt: int = 512

    def __post_init__(self):
        if self.max_capacity_prompt < 1:
            raise ValueError(f"max_capacity_prompt must be >= 1, got {self.max_capacity_prompt}")

    def keep_count(self, layer, seq_len):
        return min(seq_len, self.max_capacity_prompt)

    def score(self, layer, keys, values, queries):
        B, H, L, hs = keys.shape
        last_q = queries[:, :, -1:].float()  # (B, nh, 1, hs); the last query sees every prompt key
        attn = (last_q @ keys.float().transpose(-1, -2) / math.sqrt(hs)).softmax(dim=-1)  # (B, nh, 1, L)
        # One score per token, the same in every head, so that all heads keep the same tokens.
        return attn.mean(dim=1).expand(B, H, L)  # (B, 1, L) -> (B, nh, L)
