from dataclasses import dataclass

from .base import CapacityBudget, Compressor, attention_weights
from .registry import register


@register
@dataclass
class TOVA(CapacityBudget, Compressor):
    """TOVA, Token Omission Via Attention (Oren et al. 2024, "Transformers are Multi-State RNNs").

    Scores each prompt key by the softmax attention (float32) the LAST prompt query gives it, averaged over
    the heads of the layer, and keeps the top max_capacity_prompt = C: as in TOVA, every head of a layer
    keeps the same tokens. Prompts with L <= C stay whole.
    """

    name = "tova"
    max_capacity_prompt: int = 512

    def decode_queries(self):
        return 1  # the attention of the newest token

    def score(self, layer, keys, values, queries):
        B, H, L, _ = keys.shape
        attn = attention_weights(queries[:, :, -1:], keys)  # (B, nh, 1, L): the last query sees every key
        # One score per token, the same in every head, so that all heads keep the same tokens.
        return attn.mean(dim=1).expand(B, H, L)  # (B, 1, L) -> (B, nh, L)
