from dataclasses import dataclass

import torch

from ..prefill import Prefill
from .base import CapacityBudget, Compressor, attention_weights
from .registry import register


@register
@dataclass
class Oracle(CapacityBudget, Compressor):
    """Oracle: an UPPER BOUND, not a real method. It selects with the attention of the tokens that really
    come after the prompt, which no compressor can see when it has to decide.

    Per layer and head, of a prompt of L > C = max_capacity_prompt tokens, keeps the C keys that the F
    future tokens' queries attend to most: score = softmax over the L prompt keys only (float32) of each
    future query, summed over the F future queries. The future tokens' own keys are left out of the softmax
    on purpose: the question is only which prompt keys matter, relative to each other. Prompts with
    L <= C stay whole.

    The caller supplies the future queries before the prefill, per layer, (B, nh, F, hs) after rotary:
        oracle.future_queries = oracle_future_queries(model, prompt_ids, future_ids)
    """

    name = "oracle"
    cannot_decode = "it scores with the queries of the tokens that follow a fixed prompt, which do not exist while decoding"
    max_capacity_prompt: int = 512

    def __post_init__(self):
        super().__post_init__()
        # A plain attribute, not a dataclass field: it is data, not a setting (settings() and label skip it).
        self.future_queries: dict[int, torch.Tensor] = {}

    sees_future = True

    def see_future(self, queries):
        self.future_queries = queries

    def missing_input(self):
        if self.future_queries:
            return None
        return ("the oracle needs the queries of the tokens that come after the prompt, which a command line, a "
                "speed measurement or a stream does not have: use it in a sweep's PPL windows or tasks, or in the "
                "Python API (Oracle and oracle_future_queries)")

    def score(self, layer, keys, values, queries):
        if layer not in self.future_queries:
            raise ValueError(f"the oracle needs the future tokens' queries of layer {layer}: set "
                             f"oracle.future_queries = oracle_future_queries(model, prompt_ids, future_ids) first")
        future_q = self.future_queries[layer].to(keys.device)  # (B, nh, F, hs)
        B, H, L, hs = keys.shape
        if future_q.shape[:2] != (B, H) or future_q.size(-1) != hs:
            raise ValueError(f"future queries of layer {layer} have shape {tuple(future_q.shape)}, expected "
                             f"({B}, {H}, F, {hs}) to match the prompt's keys")
        return attention_weights(future_q, keys, causal=False).sum(dim=-2)  # (B, nh, F, L) -> (B, nh, L)


def oracle_future_queries(model, prompt_ids, future_ids) -> dict[int, torch.Tensor]:
    """Runs one uncompressed forward over prompt + future tokens and returns, per layer, the queries of
    the future positions (B, nh, F, hs) after rotary. ids: (B, L) and (B, F) tensors, or lists of ints."""
    prompt_ids, future_ids = (torch.as_tensor(ids, dtype=torch.long, device=model.embed_in.weight.device)
                              for ids in (prompt_ids, future_ids))
    prompt_ids, future_ids = (ids if ids.dim() == 2 else ids.unsqueeze(0) for ids in (prompt_ids, future_ids))
    if future_ids.size(1) == 0 or prompt_ids.size(1) == 0:
        raise ValueError("oracle_future_queries needs a non-empty prompt and at least one future token")
    prefill = Prefill.record(model, torch.cat((prompt_ids, future_ids), dim=1))  # (B, L + F)
    L = prompt_ids.size(1)
    return {layer: q[:, :, L:].clone() for layer, q in enumerate(prefill.queries)}  # not views of (B, nh, L+F, hs)
