"""StreamingLLM with `rerotate`, the official code's positions (mit-han-lab/streaming-llm, enable_pos_shift): the
keys it keeps sit at their indices in the cache and the next token at the cache's length. Checked against a
transcription of the official cache: keys held before rotary, kept, then rotated at their cache positions."""

from __future__ import annotations

import pytest
import torch

from minipythia import AdaKV, PerLayer, Pythia, StreamingLLM
from minipythia.weights import EMBEDDED_MODEL

from conftest import decode_by_hand, rotary_by_hand

C, SINKS, L = 64, 4, 300


@pytest.fixture(scope="module")
def model():
    return Pythia.from_pretrained(EMBEDDED_MODEL).for_inference()


def prompt(n: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 8000, (1, n), generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def test_kept_keys_sit_at_their_cache_positions_and_decoding_follows_the_official_cache(model):
    ids, config = prompt(L), model.config
    full = model.new_cache(1)
    token = model(ids, cache=full)[:, -1:].argmax(-1)
    cache = model.new_cache(1, StreamingLLM(n_sink=SINKS, max_capacity_prompt=C, rerotate=True))
    model(ids, cache=cache)
    kept = torch.cat((torch.arange(SINKS), torch.arange(L - (C - SINKS), L)))
    assert cache.next_position == C and cache.seen == L
    keys, values = [], []
    for layer in range(config.num_hidden_layers):
        assert torch.equal(cache.positions(layer)[0, 0], kept)  # the entries are still known by their tokens
        # The official cache: each kept key as it was before rotary, rotated at its index in the cache.
        unrotated = rotary_by_hand(full.keys(layer)[:, :, kept], (-kept).tolist(), config)
        official = rotary_by_hand(unrotated, list(range(C)), config)
        # (float32 angles of positions near 300 are rounded to about 3e-5, here and in the official cache alike)
        torch.testing.assert_close(cache.keys(layer), official, rtol=0, atol=1e-4)
        keys.append(official), values.append(full.values(layer)[:, :, kept])
    for step in range(3):  # the query at the cache's length, every new key at its own index
        by_hand, new_keys = decode_by_hand(model, token, C + step, keys, values)
        ours = model(token, cache=cache)
        torch.testing.assert_close(ours, by_hand, rtol=0, atol=1e-4)
        keys = [torch.cat((k, n), dim=2) for k, n in zip(keys, new_keys)]
        values = [torch.cat((v, cache.values(i)[:, :, -1:]), dim=2) for i, v in enumerate(values)]
        token = ours[:, -1:].argmax(-1)


@torch.no_grad()
def test_streaming_past_the_trained_length_never_reaches_a_position_beyond_the_window(model):
    interval = 8
    cache = model.new_cache(1, StreamingLLM(n_sink=SINKS, max_capacity_prompt=C, rerotate=True),
                            decode_interval=interval)
    plain = model.new_cache(1, StreamingLLM(n_sink=SINKS, max_capacity_prompt=C), decode_interval=interval)
    ids = prompt(model.config.max_position_embeddings + 200, seed=1)
    model(ids[:, :100], cache=cache), model(ids[:, :100], cache=plain)
    highest = 0
    for i in range(100, ids.size(1)):
        highest = max(highest, cache.next_position)
        model(ids[:, i : i + 1], cache=cache), model(ids[:, i : i + 1], cache=plain)
    assert highest <= C + interval and plain.next_position == ids.size(1) > model.config.max_position_embeddings
    for layer in range(model.config.num_hidden_layers):  # the same entries kept, by the same rule
        assert torch.equal(cache.positions(layer), plain.positions(layer))


def test_the_default_keeps_original_positions_and_its_label():
    assert StreamingLLM().label == "streaming_llm_sink4_c512" and "rerotate" not in StreamingLLM().settings()
    assert StreamingLLM(rerotate=True).label == "streaming_llm_sink4_c512_rerotateTrue"


def test_rerotation_needs_the_whole_cache_and_full_precision_keys():
    with pytest.raises(ValueError, match="kv_bits"):
        StreamingLLM(rerotate=True, kv_bits=4)
    with pytest.raises(ValueError, match="cannot re-rotate keys"):
        AdaKV(scorer={"compressor": "streaming_llm", "rerotate": True})
    with pytest.raises(ValueError, match="cannot re-rotate keys"):
        PerLayer(layers=("none", {"compressor": "streaming_llm", "rerotate": True}))
