"""attention_weights (compressors/base.py) masks only the last Q columns, the only ones a causal block can hide:
the same bits as the former mask over the whole (Q, L) block, kept here as the reference."""

import math

import pytest
import torch

from minipythia.compressors import base, h2o
from minipythia.compressors.base import attention_weights


def former_attention_weights(queries, keys, causal=True):
    """The implementation before the change: the causal mask built and applied over every (query, key) pair."""
    L, hs = keys.size(2), keys.size(3)
    logits = (queries.float() @ keys.float().transpose(-1, -2)).div_(math.sqrt(hs))
    if causal:
        Q = queries.size(2)
        hidden = torch.arange(L) > torch.arange(L - Q, L)[:, None]
        logits.masked_fill_(hidden, float("-inf"))
    return logits.softmax(dim=-1)


@pytest.mark.parametrize("B,H,Q,L", [(1, 8, 1, 1), (1, 8, 1, 300), (2, 3, 37, 37), (1, 4, 256, 700), (3, 2, 64, 65)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_same_bits_as_the_former_mask(B, H, Q, L, dtype):
    g = torch.Generator().manual_seed(Q * 1000 + L)
    keys = (3 * torch.randn(B, H, L, 16, generator=g)).to(dtype)
    queries = (3 * torch.randn(B, H, Q, 16, generator=g)).to(dtype)
    for causal in (False, True):
        new, old = attention_weights(queries, keys, causal), former_attention_weights(queries, keys, causal)
        assert torch.equal(new, old)
    assert (new[..., -Q:].triu(diagonal=1) == 0).all()  # and the last (causal) one hides what follows a query


def test_h2o_keeps_the_same_entries(monkeypatch):
    g = torch.Generator().manual_seed(7)
    keys, values, queries = (torch.randn(1, 8, 700, 64, generator=g) for _ in range(3))
    policy = h2o.H2O(max_capacity_prompt=128)
    new = policy.score(0, keys, values, queries)
    monkeypatch.setattr(h2o, "attention_weights", former_attention_weights)
    assert torch.equal(new, policy.score(0, keys, values, queries))
    assert base.attention_weights is attention_weights  # the reference replaced only H2O's name
