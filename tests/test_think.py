"""ThinK (query-driven key channel pruning) against a test-side transcription of the official channel
selection, its defining rules by hand, then end to end through the model and the pruned-keys cache.

The transcription is written from a reading of SalesforceAIResearch/ThinK
(`ThinK_eager/src/kv_pruning_utils.py`, key_pruner_query_driven) and NVIDIA kvpress
(`kvpress/presses/think_press.py`, ThinKPress.compress), in float64. Channel sets are compared exactly
wherever the reference's scores leave no near-tie at the cut.
"""

import math

import pytest
import torch
from conftest import decode_by_hand
from minipythia import (COMPRESSORS, TOVA, KnormPress, KVCache, NoCompression, Pythia, PythiaConfig, SnapKV,
                        build_compressor)
from minipythia.compressors.registry import decoding_policies
from minipythia.compressors.think import ThinK
from minipythia.kv import PrunedKeysStore

pytestmark = pytest.mark.usefixtures("single_thread")


def official_kept_channels(keys, queries, window, ratio):
    """The official channel selection, transcribed: keys (B, H, k, hs) after rotary and after the eviction,
    queries (B, H, L, hs) the prompt's after rotary. Returns the boolean mask (B, H, hs) of kept channels and
    the per-channel scores.

    Both sources score channel c as mean over the window's queries of q_c^2 times mean over the kept keys of
    k_c^2, and zero / drop the int(hs * ratio) lowest (topk largest=False); the official ThinK reads the last
    32 queries (hard-coded), kvpress its window_size (recomputing the window's queries with RoPE applied).
    kvpress averages the query term over the query heads of a key head (GQA); Pythia has one per head."""
    hs = keys.size(-1)
    n_pruned = int(hs * ratio)
    q_term = queries[..., -window:, :].double().pow(2).mean(dim=2)  # (B, H, hs)
    k_term = keys.double().pow(2).mean(dim=2)
    scores = q_term * k_term
    lowest = scores.topk(n_pruned, dim=-1, largest=False).indices
    pruned = torch.zeros_like(scores, dtype=torch.bool).scatter_(-1, lowest, True)
    return ~pruned, scores


def mask_of(channels, hs):
    return torch.zeros(*channels.shape[:2], hs, dtype=torch.bool).scatter_(-1, channels, True)


def random_qk(B, H, k, L, hs, seed):
    """Keys and queries whose channels differ in scale (as real ones do), so the scores spread out."""
    g = torch.Generator().manual_seed(seed)
    scale_q, scale_k = torch.rand(B, H, 1, hs, generator=g) * 3, torch.rand(B, H, 1, hs, generator=g) * 3
    return torch.randn(B, H, k, hs, generator=g) * scale_k, torch.randn(B, H, L, hs, generator=g) * scale_q


# (B, H, k kept keys, L prompt queries, hs, window)
SHAPES = [(2, 3, 40, 64, 16, 32), (1, 4, 17, 30, 64, 8), (2, 2, 5, 5, 32, 32), (1, 8, 100, 200, 64, 1),
          (3, 1, 12, 20, 10, 64)]


@pytest.mark.parametrize("B,H,k,L,hs,window", SHAPES)
@pytest.mark.parametrize("ratio", [0.0, 0.3, 0.5, 0.75, 0.99])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_channels_match_the_official_selection_on_random_tensors(B, H, k, L, hs, window, ratio, seed):
    keys, queries = random_qk(B, H, k, L, hs, seed + 7 * hs)
    ref, scores = official_kept_channels(keys, queries, window, ratio)
    n_pruned = int(hs * ratio)
    if 0 < n_pruned:  # no near-tie at the cut, so float32 and float64 must agree
        ranked = scores.sort(dim=-1).values
        gap = ranked[..., n_pruned] - ranked[..., n_pruned - 1]
        assert (gap > 1e-6 * ranked[..., n_pruned]).all(), "near-tie at the cut: pick another seed"
    channels = ThinK(window_size=window, key_channel_compression_ratio=ratio).key_channels(0, keys, queries)
    assert channels.dtype == torch.long and channels.shape == (B, H, hs - n_pruned)
    assert (channels.diff(dim=-1) > 0).all()  # ascending, no repeats
    assert torch.equal(mask_of(channels, hs), ref)


@pytest.mark.parametrize("hs,ratio,kept", [(64, 0.3, 45), (10, 0.3, 7), (16, 0.5, 8), (16, 0.99, 1), (16, 0.0, 16),
                                           (64, 0.9, 7), (80, 0.5, 40)])
def test_the_count_kept_is_the_official_formula(hs, ratio, kept):
    """hs - int(hs * ratio) kept (int(64 * 0.3) = 19 pruned, 45 kept; int(64 * 0.7) would give 44)."""
    assert kept == hs - int(hs * ratio)
    policy = ThinK(key_channel_compression_ratio=ratio)
    keys, queries = random_qk(1, 2, 9, 12, hs, 3)
    assert policy.key_channels(0, keys, queries).shape == (1, 2, kept) and policy.pruned_channels(hs) == hs - kept


def test_channels_silent_in_the_window_are_pruned_first():
    """A channel whose window queries are all zero scores 0, however large its keys and its earlier queries:
    with as many pruned as there are such channels, exactly those go; the window alone decides."""
    hs, W = 16, 8
    keys, queries = random_qk(2, 3, 30, 40, hs, 5)
    silent = [1, 6, 9, 14]  # 4 of 16: ratio 0.25 prunes exactly 4
    keys[..., silent] *= 100.0
    queries[..., :-W, :][..., silent] = 1e3  # loud before the window
    queries[..., -W:, :][..., silent] = 0.0
    channels = ThinK(window_size=W, key_channel_compression_ratio=0.25).key_channels(0, keys, queries)
    expected = [c for c in range(hs) if c not in silent]
    assert channels.reshape(-1, hs - 4).tolist() == [expected] * 6
    # A channel whose kept keys are all zero is pruned first too.
    keys, queries = random_qk(1, 2, 10, 10, hs, 6)
    keys[..., 3] = 0.0
    channels = ThinK(key_channel_compression_ratio=1 / hs).key_channels(0, keys, queries)
    assert channels.reshape(-1, hs - 1).tolist() == [[c for c in range(hs) if c != 3]] * 2


def test_the_score_is_the_product_of_the_two_mean_squares_by_hand():
    """One head, two channels, one pruned. Window of 2 queries [[1, 2], [3, 0]]: mean squares (5, 2).
    Keys [[2, 1], [0, 1]]: (2, 1), scores (10, 2), channel 0 kept. Keys [[1, 2], [1, 0]]: (1, 2), scores (5, 4),
    channel 0. Keys [[1, 3], [1, 0]]: (1, 4.5), scores (5, 9), channel 1. A window of 3 adds the query [7, 0]:
    (59/3, 4/3), scores (19.7, 6), channel 0."""
    q = torch.tensor([[[[7.0, 0.0], [1.0, 2.0], [3.0, 0.0]]]])
    cases = [([[2.0, 1.0], [0.0, 1.0]], 2, 0), ([[1.0, 2.0], [1.0, 0.0]], 2, 0), ([[1.0, 3.0], [1.0, 0.0]], 2, 1),
             ([[1.0, 3.0], [1.0, 0.0]], 3, 0)]
    for keys, window, kept in cases:
        assert ThinK(window_size=window).key_channels(0, torch.tensor([[keys]]), q).tolist() == [[[kept]]]


@pytest.mark.parametrize("scorer,C", [("snapkv", 40), ("tova", 16), ("knorm", 16), ("none", 16), ("pyramidkv", 40)])
def test_eviction_is_the_scorers_exactly(scorer, C):
    L = 64
    g = torch.Generator().manual_seed(11)
    q, k, v = (torch.randn(2, 3, L, 16, generator=g) for _ in range(3))
    policy = ThinK(max_capacity_prompt=C, scorer=scorer)
    alone = build_compressor(scorer, {"max_capacity_prompt": C} if scorer not in ("knorm", "none") else {})
    assert policy.inner == alone
    config = PythiaConfig(vocab_size=8, hidden_size=48, num_hidden_layers=2, num_attention_heads=3, intermediate_size=8)
    caches = [KVCache(config, 2, compressor=p) for p in (policy, alone)]
    for cache in caches:
        for layer in range(2):
            cache.append(layer, k, v)
            cache.compress(layer, q)
    for layer in range(2):
        assert policy.keep_count(layer, L) == alone.keep_count(layer, L)
        assert torch.equal(caches[0].positions(layer), caches[1].positions(layer))
        assert torch.equal(caches[0].values(layer), caches[1].values(layer))
        pruned, whole = caches[0].keys(layer), caches[1].keys(layer)  # the same keys, some channels zeroed
        assert bool(((pruned == whole) | (pruned == 0)).all()) and bool((pruned == 0).any())


# --- end to end --------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def model(reference_checkpoint):
    return Pythia.from_pretrained(reference_checkpoint("tiny", 0.25, True)[1]).for_inference()


def ids(model, B, T, seed):
    return torch.randint(0, model.config.vocab_size, (B, T), generator=torch.Generator().manual_seed(seed))


# (scorer settings, prompt length): snapkv's default window of 32 needs a budget above it.
END_TO_END = [(dict(scorer="snapkv", max_capacity_prompt=40), 80), (dict(scorer="tova", max_capacity_prompt=16), 40),
              (dict(scorer="none"), 40), (dict(scorer="knorm"), 40)]


@pytest.mark.parametrize("settings,L", END_TO_END)
@pytest.mark.parametrize("ratio,window", [(0.5, 32), (0.25, 4), (0.9, 1)])
@torch.no_grad()
def test_decoding_equals_the_scorers_cache_with_the_pruned_channels_zeroed(model, settings, L, ratio, window):
    """The first decode step through ThinK's cache equals a decode by hand over the scorer-alone cache's
    keys with the channels the official selection prunes set to zero; later steps decode too, and the
    pruned cache holds fewer bytes than the scorer's."""
    B, c = 2, model.config
    prompt = ids(model, B, L, 21)
    policy = ThinK(**settings, key_channel_compression_ratio=ratio, window_size=window)
    cache = model.new_cache(B, policy)
    alone = model.new_cache(B, policy.inner, record_queries=True)
    logits = model(prompt, cache=cache)
    assert all(isinstance(store, PrunedKeysStore) for store in cache.stores)
    logits_alone = model(prompt, cache=alone)
    assert torch.equal(logits, logits_alone)  # the prefill attends to every key; compression comes after
    assert cache.nbytes < alone.nbytes
    n_kept = alone.length(0)

    zeroed = []
    for i in range(c.num_hidden_layers):
        keys = alone.keys(i)
        kept, _ = official_kept_channels(keys, alone.recorded_queries[i], window, ratio)
        zeroed.append(keys * kept[:, :, None, :])
        assert torch.equal(cache.positions(i), alone.positions(i))
        assert torch.equal(cache.values(i), alone.values(i))
        assert torch.equal(cache.keys(i), zeroed[i])
    token = logits[:, -1:].argmax(-1)
    by_hand, _ = decode_by_hand(model, token, L, zeroed, [alone.values(i) for i in range(c.num_hidden_layers)])
    ours = model(token, cache=cache)
    torch.testing.assert_close(ours, by_hand, rtol=0, atol=1e-5)
    if ratio > 0.3:  # the pruning changed the result
        assert not torch.allclose(ours, model(token, cache=alone), rtol=0, atol=1e-5)
    for _ in range(3):
        ours = model(ours[:, -1:].argmax(-1), cache=cache)
        assert torch.isfinite(ours).all()
    assert cache.seen == L + 4 and cache.length(0) == n_kept + 4


@torch.no_grad()
def test_nothing_pruned_decodes_as_the_scorer_alone(model):
    prompt, token = ids(model, 1, 40, 3), ids(model, 1, 1, 4)
    cache, alone = model.new_cache(1, ThinK(16, "tova", 0.0)), model.new_cache(1, TOVA(max_capacity_prompt=16))
    model(prompt, cache=cache), model(prompt, cache=alone)
    torch.testing.assert_close(model(token, cache=cache), model(token, cache=alone), rtol=0, atol=1e-6)


def test_decode_time_compression_is_refused(model):
    with pytest.raises(ValueError, match="think cannot compress during decoding: it chooses each head's key"):
        ThinK().decode_queries()
    with pytest.raises(ValueError, match="decod"):
        model.new_cache(1, ThinK(40), decode_interval=4)
    assert "think" not in decoding_policies()


# --- settings ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("make,message", [
    (lambda: ThinK(key_channel_compression_ratio=1.0), r"key_channel_compression_ratio must be in \[0, 1\)"),
    (lambda: ThinK(key_channel_compression_ratio=-0.1), r"key_channel_compression_ratio must be in \[0, 1\)"),
    (lambda: ThinK(key_channel_compression_ratio=1.5), r"key_channel_compression_ratio must be in \[0, 1\)"),
    (lambda: ThinK(scorer="nope"), "scorer must be a registered policy, got 'nope'"),
    (lambda: ThinK(scorer="think"), "scorer cannot be 'think'"),
    (lambda: ThinK(window_size=0), "window_size must be >= 1"),
    (lambda: ThinK(max_capacity_prompt=0), "max_capacity_prompt must be >= 1"),
    (lambda: ThinK(max_capacity_prompt=16), "think's scorer snapkv .*window_size .* smaller than"),
])
def test_bad_settings_are_refused(make, message):
    with pytest.raises(ValueError, match=message):
        make()


def test_registry_label_and_scorer():
    assert COMPRESSORS["think"] is ThinK and ThinK.prunes_key_channels and not SnapKV.prunes_key_channels
    assert ThinK().label == "think_c512_snapkv_kc0.5_kw32"
    assert build_compressor("think", {"scorer": "tova", "key_channel_compression_ratio": 0.25}) == ThinK(
        scorer="tova", key_channel_compression_ratio=0.25)
    assert ThinK(100).inner == SnapKV(max_capacity_prompt=100)
    assert ThinK(scorer="knorm").inner == KnormPress() and ThinK(scorer="none").inner == NoCompression()
    assert ThinK(scorer="none").keep_count(0, 1000) == 1000
    assert "come after the prompt" in ThinK(scorer="oracle").missing_input()
    policy = ThinK(scorer="pyramidkv")
    policy.for_model(PythiaConfig(vocab_size=8, hidden_size=16, num_hidden_layers=3, num_attention_heads=1,
                                  intermediate_size=8))
    assert policy.inner.num_layers == 3
    with pytest.raises(TypeError, match="think.key_channel_compression_ratio must be a float"):
        ThinK(key_channel_compression_ratio="0.5")
    assert isinstance(ThinK(key_channel_compression_ratio=0).key_channel_compression_ratio, float)
    assert math.isclose(ThinK(key_channel_compression_ratio=1 / 3).key_channel_compression_ratio, 1 / 3)
