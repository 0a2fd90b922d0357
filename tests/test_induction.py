"""Wiring a copy-from-context circuit (minipythia/induction.py): each head does what its docstring says, and
a model that could not copy from its context then does."""

import pytest
import torch
import torch.nn.functional as F

from minipythia.config import PythiaConfig
from minipythia.induction import wire_induction_heads
from minipythia.model import Pythia, apply_rotary_
from minipythia.train import copy_gain

RUN = 60  # a run of random tokens, then the same run again


def attention(model, ids, layer, head):
    """The attention probabilities (B, T, T) of one head, recomputed from its layer's input."""
    seen = {}
    handle = model.layers[layer].attention.register_forward_hook(lambda m, args, out: seen.update(m=m, args=args))
    with torch.no_grad():
        model(ids)
        handle.remove()
        attn, (x, cos, sin) = seen["m"], seen["args"][:3]
        B, T, _ = x.shape
        qkv = attn.query_key_value(x).view(B, T, attn.n_head, 3, attn.head_size)
        apply_rotary_(qkv[:, :, :, :2], cos, sin)
        q, k = qkv[:, :, head, 0], qkv[:, :, head, 1]  # (B, T, hs)
        scores = q @ k.transpose(1, 2) / attn.head_size ** 0.5
        return scores.masked_fill(torch.ones(T, T, dtype=torch.bool).triu(1), float("-inf")).softmax(-1)


@pytest.fixture(scope="module")
def wired():
    config = PythiaConfig(vocab_size=512, hidden_size=192, num_hidden_layers=2, num_attention_heads=4,
                          intermediate_size=768, max_position_embeddings=512)
    g = torch.Generator().manual_seed(0)
    text = torch.randint(1, 512, (48, 256), generator=g)
    plain = Pythia(config).init_weights(seed=0).eval()
    # A random LM head (std 0.02) moves its logits little per unit written, hence a larger copy_scale than
    # the default meant for a trained model.
    model = wire_induction_heads(Pythia(config).init_weights(seed=0).eval(), text, copy_scale=300.0)
    run = torch.randint(1, 512, (4, RUN), generator=g)
    return plain, model, text, torch.cat((run, run), dim=1)


def test_previous_token_head_attends_to_the_token_before(wired):
    _, model, _, repeated = wired
    probs = attention(model, repeated, layer=0, head=3)
    offset_one = torch.diagonal(probs, offset=-1, dim1=1, dim2=2)  # probs[:, i, i - 1]
    assert offset_one.mean() > 0.95


def test_previous_token_head_stays_on_the_token_before_far_into_a_long_row(wired):
    """Far offsets can alias with offset 1 in the rotary phases (818 did, when only the three fastest
    frequencies were used); every frequency together rules that out."""
    _, model, _, _ = wired
    ids = torch.randint(1, 512, (1, 1024), generator=torch.Generator().manual_seed(1))
    offset_one = torch.diagonal(attention(model, ids, layer=0, head=3), offset=-1, dim1=1, dim2=2)
    assert offset_one[:, 800:].min() > 0.95


def test_induction_head_attends_after_the_earlier_occurrence(wired):
    plain, model, _, repeated = wired
    for m, low, high in ((plain, 0.0, 0.05), (model, 0.5, 1.0)):
        probs = attention(m, repeated, layer=1, head=0)
        # In the second copy, position i's token last occurred at i - RUN; the token after it is at i - RUN + 1.
        after_match = torch.diagonal(probs, offset=1 - RUN, dim1=1, dim2=2)[:, 1:]
        assert low <= after_match.mean() <= high


def test_the_wired_model_copies_from_its_context(wired):
    plain, model, text, _ = wired
    assert abs(copy_gain(plain, text.flatten())) < 0.05
    assert copy_gain(model, text.flatten()) > 0.8


def test_shapes_without_room_for_the_circuit_are_refused():
    one_layer = Pythia(PythiaConfig(vocab_size=64, hidden_size=64, num_hidden_layers=1, num_attention_heads=2,
                                    intermediate_size=256, max_position_embeddings=64))
    with pytest.raises(ValueError, match="induction layer"):
        wire_induction_heads(one_layer, torch.randint(0, 64, (2, 16)))
