from dataclasses import dataclass

import torch

from .base import CapacityBudget, Compressor
from .registry import register


@register
@dataclass
class StreamingLLM(CapacityBudget, Compressor):
    """StreamingLLM (Xiao et al. 2023, "Efficient Streaming Language Models with Attention Sinks").

    Keeps, in every layer and head, the first `n_sink` prompt tokens (the attention sinks) and the most
    recent `max_capacity_prompt - n_sink` ones: positions [0, n_sink) and [L - (C - n_sink), L) of a
    prompt of L > C tokens. Prompts with L <= C stay whole.
    """

    name = "streaming_llm"
    label_names = {"n_sink": "sink"}
    n_sink: int = 4
    max_capacity_prompt: int = 512

    def validate(self):
        if self.n_sink < 0:
            raise ValueError(f"n_sink must be >= 0, got {self.n_sink}")
        if self.n_sink >= self.max_capacity_prompt:
            raise ValueError(f"n_sink ({self.n_sink}) must be smaller than max_capacity_prompt "
                             f"({self.max_capacity_prompt}) to leave room for recent tokens")
        super().validate()

    def decode_queries(self):
        return 0  # ranks entries by position

    def score(self, layer, keys, values, queries):
        B, H, L = keys.shape[:3]
        # Later = better, so the top C - n_sink non-sinks are the most recent; the sinks rank above all.
        scores = torch.arange(L, device=keys.device, dtype=torch.float32)
        scores[: self.n_sink] = float("inf")
        return scores.expand(B, H, L)
