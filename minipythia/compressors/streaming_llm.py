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

    Positions: by default the kept keys keep the rotary of their original positions and the next token takes
    its true position (as kvpress without its key-rerotation press). With `rerotate`, as the official code
    (mit-han-lab/streaming-llm, `enable_pos_shift`, which caches keys before rotary and rotates them at their
    index in the cache every step): each kept key is moved to its index in the cache and the next token takes
    the cache's length as its position, so the model never sees a position beyond budget (+ decode_interval),
    what lets it stream past its trained length. Here the move is one rotation of each kept key by
    (new index - old index) when it is kept (rotations compose), in float32.
    """

    name = "streaming_llm"
    label_names = {"n_sink": "sink"}
    omitted_at_default = ("rerotate",)
    n_sink: int = 4
    max_capacity_prompt: int = 512
    rerotate: bool = False

    @property
    def rerotates_keys(self):
        return self.rerotate

    def validate(self):
        if self.rerotate and self.kv_bits is not None:
            raise ValueError("rerotate moves the keys it keeps, which quantized storage (kv_bits) does not hold in "
                             "full precision; leave one of them unset")
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
