"""The cache of policies that prune key channels (prunes_key_channels): it holds only the kept channels of
the prompt's keys, and decoding over it equals attention computed by hand over the keys with the dropped
channels zeroed. (ThinK's own channel choice is tested in test_think.py; here a policy of the test's own.)"""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch

from minipythia import Pythia, SnapKV
from minipythia.kv import PrunedKeysStore
from minipythia.weights import EMBEDDED_MODEL

from conftest import decode_by_hand


@dataclass
class HalfChannels(SnapKV):
    """SnapKV's eviction, then the half of each head's key channels with the largest summed magnitude."""
    name = "half_channels"  # not registered: a test's policy
    prunes_key_channels = True

    def key_channels(self, layer, keys, queries):
        return keys.abs().sum(dim=2).topk(keys.size(-1) // 2, dim=-1).indices.sort(dim=-1).values


@pytest.fixture(scope="module")
def model():
    return Pythia.from_pretrained(EMBEDDED_MODEL).for_inference()


def test_decoding_attends_to_the_kept_channels_only(model):
    ids = torch.randint(0, 8000, (1, 500), generator=torch.Generator().manual_seed(0))
    policy = HalfChannels(max_capacity_prompt=200)
    pruned, plain = model.new_cache(compressor=policy), model.new_cache(compressor=SnapKV(max_capacity_prompt=200))
    token = model(ids, cache=pruned)[:, -1:].argmax(-1)
    model(ids, cache=plain)
    assert pruned.nbytes < 0.8 * plain.nbytes  # half the prompt's keys: a quarter of K and V, less the indices
    keys, values = [], []
    for layer in range(plain.num_layers):
        k = plain.keys(layer)
        kept = policy.key_channels(layer, k, None)
        mask = torch.zeros_like(k).scatter_(3, kept[:, :, None, :].expand(-1, -1, k.size(2), -1), 1.0)
        keys.append(k * mask)  # the dropped channels zeroed
        values.append(plain.values(layer))
        assert torch.equal(pruned.positions(layer), plain.positions(layer))
        store = pruned.stores[layer]
        assert isinstance(store, PrunedKeysStore) and store._keys.size(-1) == k.size(-1) // 2
    for step in range(3):
        by_hand, new_keys = decode_by_hand(model, token, 500 + step, keys, values)
        ours = model(token, cache=pruned)
        torch.testing.assert_close(ours, by_hand, rtol=0, atol=1e-5)
        keys = [torch.cat((k, new), dim=2) for k, new in zip(keys, new_keys)]  # later keys stored whole
        values = [pruned.values(layer) for layer in range(pruned.num_layers)]
        token = ours[:, -1:].argmax(-1)


def test_it_cannot_compress_during_decoding(model):
    with pytest.raises(ValueError, match="cannot compress during decoding"):
        model.new_cache(compressor=HalfChannels(), decode_interval=8)
