"""DuoAttention (retrieval and streaming heads), kvpress's on-the-fly head pattern, heads ranked over the whole
model (kvpress's and the official code's) or per layer."""

import numpy as np
import pytest
import torch

from minipythia import build_compressor
from minipythia.compressors.duo_attention import DuoAttention
from minipythia.config import PythiaConfig
from minipythia.model import Pythia
from minipythia.kv import RaggedStore

from conftest import check_decoding_by_hand, decode_by_hand, random_ids, rotary_by_hand

pytestmark = pytest.mark.usefixtures("single_thread")

CONFIG = PythiaConfig(vocab_size=64, hidden_size=128, num_attention_heads=8, num_hidden_layers=1,
                      intermediate_size=64, max_position_embeddings=64, rotary_pct=0.25)


def kvpress_on_the_fly(q_pre, k_pre, config, q_len):
    """A transcription of kvpress `kvpress/presses/duo_attention_press.py`, duo_attention_on_the_fly, for
    one layer and one sample (no GQA): q_pre, k_pre (nh, L, hs) before rotary -> head scores (nh,)."""
    d = q_pre.size(-1)
    q = q_pre.mean(dim=1, keepdim=True).repeat(1, q_len, 1)  # mean query, repeated q_len times
    k = k_pre.mean(dim=1, keepdim=True).repeat(1, q_len, 1)
    q, k = rotary_by_hand(q, range(q_len), config), rotary_by_hand(k, range(q_len), config)  # RoPE at 0..q_len-1
    attn_weights = torch.matmul(q[:, -1:, :], k.transpose(1, 2)) / (d ** 0.5)  # the last token
    attn_weights = attn_weights.softmax(dim=-1, dtype=torch.float32).squeeze()  # (nh, q_len)
    return torch.cumsum(attn_weights, dim=1).mean(1)  # area under the cumulated attention curve


def kvpress_streaming_mask(head_scores, ratio):
    """kvpress DuoAttentionPress.__post_init_from_model__: the round(size * ratio) lowest heads stream."""
    n_pruned = round(head_scores.size * ratio)
    mask = np.zeros(head_scores.shape, dtype=bool)
    if n_pruned > 0:
        mask[np.unravel_index(np.argsort(head_scores, axis=None)[:n_pruned], head_scores.shape)] = True
    return mask


def rotated_prompt(seed, L=48, B=2):
    """Queries and keys before rotary (B, nh, L, hs) with heads of varied reach, and after it at 0..L-1."""
    g = torch.Generator().manual_seed(seed)
    H, hs = CONFIG.num_attention_heads, CONFIG.head_size
    q, k = torch.randn(B, H, L, hs, generator=g), torch.randn(B, H, L, hs, generator=g)
    shift = torch.randn(B, H, 1, hs, generator=g) * torch.linspace(0.5, 6, H)[:, None, None]  # mean directions
    q, k = q + shift, k + shift.roll(1, dims=1) * 0.7
    return (q, k), (rotary_by_hand(q, range(L), CONFIG), rotary_by_hand(k, range(L), CONFIG))


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("ratio", [0.25, 0.5, 0.75])
def test_streaming_heads_are_kvpress_on_the_fly(seed, ratio):
    (q_pre, k_pre), (q, k) = rotated_prompt(seed)
    policy = DuoAttention(head_compression_ratio=ratio, sink_size=4, recent_size=8, pattern_length=100,
                          head_ranking="layer")
    policy.for_model(CONFIG)
    scores = policy.score(0, k, k, q)
    mask = policy.select(0, scores, policy.keep_count(0, k.size(2)))
    for b in range(q.size(0)):
        ref = kvpress_on_the_fly(q_pre[b], k_pre[b], CONFIG, 100)
        torch.testing.assert_close(scores[b, :, 0], ref, rtol=1e-4, atol=1e-5)
        assert len(set(ref.tolist())) == ref.numel()  # no ties: the ranking is kvpress's
        streaming = torch.from_numpy(kvpress_streaming_mask(ref.numpy(), ratio))
        assert torch.equal(~mask[b].all(dim=-1), streaming)


def test_heads_keep_sinks_and_recent_or_everything():
    (_, _), (q, k) = rotated_prompt(0, L=40)
    policy = DuoAttention(head_compression_ratio=0.5, sink_size=3, recent_size=5, pattern_length=64,
                          head_ranking="layer")
    policy.for_model(CONFIG)
    keep = policy.keep_count(0, 40)
    H = CONFIG.num_attention_heads
    assert keep == (4 * 8 + 4 * 40) // H
    mask = policy.select(0, policy.score(0, k, k, q), keep)
    window = torch.zeros(40, dtype=torch.bool)
    window[:3] = window[-5:] = True
    for b in range(2):
        streaming = [h for h in range(H) if not mask[b, h].all()]
        assert len(streaming) == 4
        for h in streaming:
            assert torch.equal(mask[b, h], window)
    # a prompt no longer than the window stays whole; ratio 0 keeps everything
    assert policy.keep_count(0, 8) == 8 and policy.keep_count(0, 5) == 5
    none = DuoAttention(head_compression_ratio=0.0, sink_size=3, recent_size=5, head_ranking="layer")
    none.for_model(CONFIG)
    assert none.keep_count(0, 40) == 40
    assert bool(none.select(0, none.score(0, k, k, q), 40).all())
    every = DuoAttention(head_compression_ratio=1.0, sink_size=3, recent_size=5, head_ranking="layer")
    every.for_model(CONFIG)
    assert every.keep_count(0, 40) == 8
    assert torch.equal(every.select(0, every.score(0, k, k, q), 8), window.expand(2, H, 40))


@pytest.mark.parametrize("settings", [dict(head_compression_ratio=-0.1), dict(head_compression_ratio=1.5),
                                      dict(sink_size=-1), dict(recent_size=0), dict(pattern_length=0),
                                      dict(head_ranking="head")])
def test_bad_settings_raise(settings):
    with pytest.raises(ValueError):
        DuoAttention(**settings)


def test_registered_and_cannot_decode():
    policy = build_compressor("duo_attention", {"head_compression_ratio": 0.25})
    assert isinstance(policy, DuoAttention) and policy.headwise
    assert policy.head_ranking == "model"
    assert policy.label == "duo_attention_hr0.25_sink128_rec256_q500_bymodel"
    with pytest.raises(ValueError, match="cannot compress during decoding"):
        policy.decode_queries()


@pytest.fixture(scope="module")
def model(reference_checkpoint):
    return Pythia.from_pretrained(reference_checkpoint("tiny", 0.25, True)[1]).for_inference()


@torch.no_grad()
@pytest.mark.parametrize("ranking", ["model", "layer"])
def test_end_to_end_ragged_cache_and_decoding(model, ranking):
    L, B = 96, 2
    ids = random_ids(model, B, L, seed=3)
    policy = DuoAttention(head_compression_ratio=0.5, sink_size=4, recent_size=16, pattern_length=200,
                          head_ranking=ranking)
    cache = model.new_cache(B, compressor=policy)
    forwards = []
    hook = model.embed_in.register_forward_hook(lambda module, args, out: forwards.append(args[0].shape))
    try:
        token = model(ids, cache=cache)[:, -1:].argmax(-1)
    finally:
        hook.remove()
    assert forwards == [(B, L)]  # the model-wide ranking reads the prefill's own record: the prompt runs once
    assert all(isinstance(store, RaggedStore) for store in cache.stores)
    full = model.new_cache(B, record_queries=True)
    model(ids, cache=full)
    n_layers, H = model.config.num_hidden_layers, model.config.num_attention_heads
    # kvpress's streaming heads, from the on-the-fly scores of every layer (the model) or of each layer alone.
    head_scores = torch.stack([policy.head_scores(full.keys(i), full.recorded_queries[i]) for i in range(n_layers)],
                              dim=1)  # (B, layers, nh)
    streaming = [kvpress_streaming_mask(head_scores[b].numpy(), 0.5) if ranking == "model" else
                 np.stack([kvpress_streaming_mask(row.numpy(), 0.5) for row in head_scores[b]]) for b in range(B)]
    keys, values, valid = [], [], []
    for layer in range(n_layers):
        k, v, q = full.keys(layer), full.values(layer), full.recorded_queries[layer]
        mask = policy.select(layer, policy.score(layer, k, v, q), policy.keep_count(layer, L))
        lengths = cache.lengths(layer)
        assert torch.equal(lengths, mask.sum(-1))
        for b in range(B):  # a streaming head keeps its sinks and recent entries, a retrieval head everything
            expected = torch.where(torch.from_numpy(streaming[b][layer]), 20, L)
            assert torch.equal(lengths[b], expected)
        keys.append(k), values.append(v), valid.append(mask)
    per_layer = [int(torch.from_numpy(streaming[0][layer]).sum()) for layer in range(n_layers)]
    assert sum(per_layer) == n_layers * H // 2
    if ranking == "model":
        assert len(set(per_layer)) > 1  # layers stream different numbers of heads here
    valid = check_decoding_by_hand(model, cache, token, L, keys, values, valid)  # each head's entries
    assert torch.equal(cache.lengths(0), valid[0][..., :L].sum(-1) + 3)


def test_model_wide_ranking_needs_prepare():
    (_, _), (q, k) = rotated_prompt(0, L=40)
    policy = DuoAttention(sink_size=3, recent_size=5)
    policy.for_model(CONFIG)
    with pytest.raises(ValueError, match="prepare"):
        policy.select(0, policy.score(0, k, k, q), policy.keep_count(0, 40))


def test_a_calibrated_pattern_from_a_few_books_replaces_the_prompts_own(tiny_checkpoint, tmp_path):
    """python -m eval.calibrate_duo writes per-(layer, head) scores, the on-the-fly score averaged over the
    books' prompts; DuoAttention(pattern_file=...) then streams the heads that file ranks lowest."""
    import json

    from eval.calibrate_duo import main
    from minipythia.cli import run_cli

    books = tmp_path / "books"
    books.mkdir()
    for name in ("a", "b"):
        (books / f"{name}.txt").write_text(" ".join([f"the {name} fox jumps over a lazy dog"] * 80))
    out = tmp_path / "pattern.json"
    assert run_cli(main, ["--model", str(tiny_checkpoint), "--data", str(books), "--prompt-len", "96",
                          "--out", str(out)]) == 0
    pattern = json.loads(out.read_text())
    assert pattern["books"] == ["a", "b"] and len(pattern["scores"]) == 2 and len(pattern["scores"][0]) == 4
    model = Pythia.from_pretrained(tiny_checkpoint).for_inference()
    k = q = torch.randn(1, 4, 60, 16)
    by_layer = DuoAttention(head_compression_ratio=0.5, sink_size=4, recent_size=16, pattern_file=str(out),
                            head_ranking="layer")
    by_layer.for_model(model.config)
    for layer, row in enumerate(pattern["scores"]):
        kept = by_layer.select(layer, by_layer.score(layer, k, k, q), 0).sum(-1)[0]  # whatever the prompt
        streaming = set(torch.tensor(row).argsort()[:2].tolist())
        assert {h for h in range(4) if kept[h] == 20} == streaming
    # Ranked over the model (the default, needing no prepare): the file's 4 lowest of its 2 x 4 heads stream.
    by_model = DuoAttention(head_compression_ratio=0.5, sink_size=4, recent_size=16, pattern_file=str(out))
    by_model.for_model(model.config)
    expected = kvpress_streaming_mask(np.array(pattern["scores"]), 0.5)
    for layer in range(2):
        kept = by_model.select(layer, by_model.score(layer, k, k, q), 0).sum(-1)[0]
        assert torch.equal(kept == 20, torch.from_numpy(expected[layer]))
    (tmp_path / "bad.json").write_text('{"scores": [[0.1, 0.2]]}')
    with pytest.raises(ValueError, match="calibrate it for this model"):
        DuoAttention(pattern_file=str(tmp_path / "bad.json")).for_model(model.config)
    with pytest.raises(ValueError, match="cannot read the head pattern"):
        DuoAttention(pattern_file=str(tmp_path / "missing.json"))
