"""Storage kinds compose (minipythia.kv): head-wise budgets stored in 4 bits, pruned key channels stored in 4 bits,
a head-wise and a dense policy in one model, and decode-time compression of a quantized cache. Each is checked
against attention computed by hand (conftest.decode_by_hand) over entries quantized by hand as KIVI says."""

from __future__ import annotations

import pytest
import torch

from minipythia import NoCompression, Pythia, SnapKV, StreamingLLM, build_compressor
from minipythia.compressors.adakv import AdaKV
from minipythia.compressors.per_layer import PerLayer
from minipythia.compressors.think import ThinK
from minipythia.kv import DenseStore, PrunedKeysStore, QuantizedStore, RaggedStore
from minipythia.weights import EMBEDDED_MODEL

from conftest import check_decoding_by_hand, decode_by_hand

BITS, G, R = 4, 32, 128
# Logits of about 10 over 500+ entries summed in another order than by hand: float32 rounding reaches 1e-5.
ATOL = 3e-5
# One step by hand: the next ones would also quantize, by hand, the values that leave the newest R (KIVI's
# decoding, the same code for every store kind and checked in test_quantized_cache.py).
STEPS = 1


@pytest.fixture(scope="module")
def model():
    return Pythia.from_pretrained(EMBEDDED_MODEL).for_inference()


def prompt(n: int, batch: int = 1, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 8000, (batch, n), generator=torch.Generator().manual_seed(seed))


def fake_quantized(x: torch.Tensor, bits: int, group: int, along_tokens: bool) -> torch.Tensor:
    """x (n, D) of one head as KIVI's codes give it back, written out group by group: a group's minimum and
    scale (max - min) / (2^bits - 1) rounded to float16, each value rounded to the nearest step."""
    out = x.clone()
    n, D = x.shape
    spans = ([(slice(t, t + group), slice(None)) for t in range(0, n, group)] if along_tokens
             else [(slice(t, t + 1), slice(c, c + group)) for t in range(n) for c in range(0, D, group)])
    for rows, cols in spans:
        block = x[rows, cols].float()
        low, high = block.amin(dim=0 if along_tokens else 1, keepdim=True), block.amax(
            dim=0 if along_tokens else 1, keepdim=True)
        minimum, scale = low.half().float(), ((high - low) / (2**bits - 1)).half().float()
        steps = torch.where(scale == 0, 0.0, ((block - minimum) / torch.where(scale == 0, 1.0, scale)).round()
                            .clamp(0, 2**bits - 1))
        out[rows, cols] = steps * scale + minimum
    return out


def kivi_head(keys: torch.Tensor, values: torch.Tensor, head_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """One head's n kept entries as a quantized cache holds them after the prefill: keys but the last n % R
    quantized per channel in groups of G tokens, values but the last R per token in groups of G channels."""
    n = keys.size(0)
    n_keys, n_values = n - n % R, max(0, n - R)
    keys, values = keys.clone(), values.clone()
    keys[:n_keys] = fake_quantized(keys[:n_keys], BITS, G, along_tokens=True)
    values[:n_values] = fake_quantized(values[:n_values], BITS, G if head_size % G == 0 else head_size, False)
    return keys, values


def quantized_by_hand(cache) -> tuple[list, list, list]:
    """Every layer of an unquantized cache, each head's entries (padding excluded) quantized by kivi_head."""
    keys, values, valid = [], [], []
    for layer in range(cache.num_layers):
        k, v = cache.keys(layer).clone(), cache.values(layer).clone()
        mask = cache.key_padding(layer)
        mask = torch.ones(k.shape[:3], dtype=torch.bool) if mask is None else mask
        for b in range(k.size(0)):
            for h in range(k.size(1)):
                slots = mask[b, h].nonzero().squeeze(1)
                k[b, h, slots], v[b, h, slots] = kivi_head(k[b, h, slots], v[b, h, slots], k.size(-1))
        keys.append(k), values.append(v), valid.append(mask)
    return keys, values, valid


@torch.no_grad()
def test_adakv_in_4_bits_frees_memory_per_head_and_decodes_over_each_heads_quantized_entries(model):
    ids = prompt(768, batch=2)
    plain = model.new_cache(2, AdaKV())  # its default budget, 512 per head on average
    quantized = model.new_cache(2, AdaKV(kv_bits=BITS, kv_group_size=G, kv_residual=R))
    token = model(ids, cache=plain)[:, -1:].argmax(-1)
    assert torch.equal(model(ids, cache=quantized)[:, -1:].argmax(-1), token)  # the prefill saw the full KV
    assert all(isinstance(s, RaggedStore) and all(isinstance(g.store, QuantizedStore) for g in s.groups)
               for s in quantized.stores)
    for layer in range(model.config.num_hidden_layers):  # the same entries per head, at the same positions
        assert torch.equal(quantized.lengths(layer), plain.lengths(layer))
        assert torch.equal(quantized.positions(layer), plain.positions(layer))
    assert len(set(plain.lengths(0)[0].tolist())) > 1  # the heads kept different numbers of entries
    assert quantized.nbytes <= 0.4 * plain.nbytes
    keys, values, valid = quantized_by_hand(plain)
    check_decoding_by_hand(model, quantized, token, 768, keys, values, valid, steps=STEPS, atol=ATOL)


@torch.no_grad()
def test_think_in_4_bits_quantizes_the_kept_channels_of_the_prompts_keys(model):
    ids = prompt(600, batch=2, seed=1)
    policy = ThinK(max_capacity_prompt=300, key_channel_compression_ratio=0.5)
    plain = model.new_cache(2, policy)
    quantized = model.new_cache(2, build_compressor("think", dict(max_capacity_prompt=300, kv_bits=BITS)))
    token = model(ids, cache=plain)[:, -1:].argmax(-1)
    model(ids, cache=quantized)
    assert all(isinstance(s, QuantizedStore) and s.pruned is not None for s in quantized.stores)
    assert all(isinstance(s, PrunedKeysStore) for s in plain.stores)
    assert quantized.nbytes < 0.5 * plain.nbytes  # of 300 kept entries, the newest 128 values stay in float32
    # The pruned keys, zeros in their dropped channels, quantized per channel: a dropped channel stays zero.
    keys, values, valid = quantized_by_hand(plain)
    check_decoding_by_hand(model, quantized, token, 600, keys, values, valid, steps=STEPS, atol=ATOL)


@torch.no_grad()
def test_per_layer_mixes_a_dense_and_a_headwise_policy(model):
    ids = prompt(500, batch=2, seed=2)
    mixed = model.new_cache(2, PerLayer(max_capacity_prompt=128, layers=("snapkv", "adakv")))
    snap, ada = model.new_cache(2, SnapKV(max_capacity_prompt=128)), model.new_cache(2, AdaKV(max_capacity_prompt=128))
    token = model(ids, cache=mixed)[:, -1:].argmax(-1)
    model(ids, cache=snap), model(ids, cache=ada)
    assert isinstance(mixed.stores[0], DenseStore) and all(isinstance(s, RaggedStore) for s in mixed.stores[1:])
    alone = [snap] + [ada] * (model.config.num_hidden_layers - 1)  # each layer's own policy's cache
    keys = [c.keys(layer) for layer, c in enumerate(alone)]
    values = [c.values(layer) for layer, c in enumerate(alone)]
    valid = [torch.ones(k.shape[:3], dtype=torch.bool) if c.key_padding(layer) is None else c.key_padding(layer)
             for layer, (k, c) in enumerate(zip(keys, alone))]
    assert mixed.headwise and not snap.headwise and not mixed.holds_copies
    check_decoding_by_hand(model, mixed, token, 500, keys, values, valid)


@torch.no_grad()
def test_decode_time_compression_of_a_quantized_cache_requantizes_what_it_keeps(model):
    """StreamingLLM in 4 bits (R = G = 32) compressing during decoding: when a step leaves a layer above budget +
    interval, the kept entries (dequantized, then the sinks and the newest) are quantized again as a prefill's
    would be; the positions are those StreamingLLM keeps unquantized."""
    C, interval, r = 72, 4, 32
    policy = StreamingLLM(n_sink=4, max_capacity_prompt=C, kv_bits=BITS, kv_group_size=G, kv_residual=r)
    cache = model.new_cache(1, policy, decode_interval=interval)
    plain = model.new_cache(1, StreamingLLM(n_sink=4, max_capacity_prompt=C), decode_interval=interval)
    ids = prompt(100, seed=3)
    token = model(ids, cache=cache)[:, -1:].argmax(-1)
    model(ids, cache=plain)
    n_layers = model.config.num_hidden_layers
    for step in range(interval + 1):  # the last step leaves C + interval + 1 entries: compressed back to C
        before = [(cache.keys(i), cache.values(i)) for i in range(n_layers)]
        before_positions = [cache.positions(i) for i in range(n_layers)]
        by_hand, new_keys = decode_by_hand(model, token, 100 + step, *zip(*before))
        logits = model(token, cache=cache)
        torch.testing.assert_close(logits, by_hand, rtol=0, atol=1e-5)  # attention before the compression
        model(token, cache=plain)
        token = logits[:, -1:].argmax(-1)
    for i in range(n_layers):
        assert isinstance(cache.stores[i], QuantizedStore) and cache.length(i) == C
        assert torch.equal(cache.positions(i), plain.positions(i))
        old_keys, old_values = before[i]
        # The newest key and value stay in the full-precision tails (C % r keys, r values): only older entries,
        # those the cache held before the step, are quantized again.
        entries = (torch.cat((old_keys, new_keys[i]), dim=2), torch.cat((old_values, old_values[:, :, -1:]), dim=2))
        held = torch.cat((before_positions[i][0, 0], torch.tensor([100 + interval])))
        kept = torch.isin(held, cache.positions(i)[0, 0]).nonzero().squeeze(1)
        assert kept.numel() == C
        k, v = (x[0, :, kept] for x in entries)  # (nh, C, hs): the sinks and the newest
        hs = k.size(-1)
        for h in range(k.size(0)):
            want_k = fake_quantized(k[h, : C - C % r], BITS, G, True)
            want_v = fake_quantized(v[h, : C - r], BITS, G if hs % G == 0 else hs, False)
            torch.testing.assert_close(cache.keys(i)[0, h, : C - C % r], want_k, rtol=0, atol=1e-6)
            torch.testing.assert_close(cache.values(i)[0, h, : C - r], want_v, rtol=0, atol=1e-6)


def test_the_store_a_layer_becomes_follows_the_policy(model):
    ids = prompt(300, seed=4)
    cases = [(NoCompression(), DenseStore), (SnapKV(max_capacity_prompt=64), DenseStore),
             (AdaKV(max_capacity_prompt=64), RaggedStore), (ThinK(max_capacity_prompt=64), PrunedKeysStore),
             (SnapKV(max_capacity_prompt=64, kv_bits=2), QuantizedStore)]
    for policy, kind in cases:
        cache = model.new_cache(1, policy)
        assert all(type(s) is DenseStore for s in cache.stores)  # the prefill is stored whole
        model(ids, cache=cache)
        assert all(type(s) is kind for s in cache.stores), policy.label
