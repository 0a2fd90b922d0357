"""The eviction policies beside SnapKV and KnormPress: each against its defining rule, then end to end.

StreamingLLM, H2O, TOVA, random, PyramidKV and the oracle (an upper bound fed with the future tokens' queries).
Scores written by hand here are computed in float64, and every comparison of kept sets first checks that
no near-tie sits at the cut, so a pass or a failure never hangs on float noise.
"""

import argparse
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import causal_attention, random_ids, rotary_by_hand
from minipythia import (COMPRESSORS, H2O, TOVA, KnormPress, KVCache, NoCompression, Oracle, Pythia, PythiaConfig,
                        PyramidKV, RandomEviction, SnapKV, StreamingLLM, generate, oracle_future_queries)
from minipythia.compressors import h2o as h2o_module

pytestmark = pytest.mark.usefixtures("single_thread")

ROOT = Path(__file__).resolve().parents[1]


def random_qkv(B=2, H=3, L=40, D=16, seed=0, scale=1.5):
    g = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(B, H, L, D, generator=g) * scale for _ in range(3))


def compress_layers(compressor, qkv_per_layer):
    """A cache of len(qkv_per_layer) layers, each filled with its (q, k, v) and compressed, in layer order
    (as the model's prefill does)."""
    B, H, _, D = qkv_per_layer[0][0].shape
    config = PythiaConfig(vocab_size=8, hidden_size=H * D, num_hidden_layers=len(qkv_per_layer),
                          num_attention_heads=H, intermediate_size=8)
    cache = KVCache(config, B, compressor=compressor)
    for layer, (q, k, v) in enumerate(qkv_per_layer):
        cache.append(layer, k, v)
        cache.compress(layer, q)
    return cache


def top_positions(scores, n):
    """The n best positions of scores (..., L), in position order, after checking no near-tie at the cut."""
    ranked = scores.sort(dim=-1, descending=True)
    if 0 < n < scores.size(-1):
        gap = ranked.values[..., n - 1] - ranked.values[..., n]
        assert (gap > 1e-6).all(), "near-tie at the cut: pick another seed"
    return ranked.indices[..., :n].sort(dim=-1).values


def check_gathered(cache, layer, k, v):
    """The kept K, V are the full ones at the kept positions."""
    idx = cache.positions(layer).unsqueeze(-1).expand(-1, -1, -1, k.size(-1))
    assert torch.equal(cache.keys(layer), k.gather(2, idx)) and torch.equal(cache.values(layer), v.gather(2, idx))


# --- StreamingLLM ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("L,C,n_sink", [(40, 16, 4), (40, 16, 0), (40, 5, 4), (40, 16, 15), (17, 16, 4),
                                        (16, 16, 4), (10, 16, 4)])
def test_streaming_llm_keeps_sinks_and_most_recent(L, C, n_sink):
    q, k, v = random_qkv(L=L)
    cache = compress_layers(StreamingLLM(n_sink=n_sink, max_capacity_prompt=C), [(q, k, v), (q, k, v)])
    expected = list(range(L)) if L <= C else list(range(n_sink)) + list(range(L - (C - n_sink), L))
    for layer in range(2):
        positions = cache.positions(layer)
        assert all(p == expected for p in positions.reshape(-1, positions.size(-1)).tolist())
        check_gathered(cache, layer, k, v)


# --- H2O ---------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("chunk", [7, 40, 256])
def test_h2o_score_is_the_attention_column_sum(monkeypatch, chunk):
    """Whatever the query chunking, the score of each non-recent key is the attention it received, summed
    over every prompt query (causal softmax rows); the recent ones score +inf."""
    monkeypatch.setattr(h2o_module, "QUERY_CHUNK", chunk)
    L, C = 40, 16
    q, k, v = random_qkv(L=L)
    h2o = H2O(max_capacity_prompt=C, recent_ratio=0.25)
    scores = h2o.score(0, k, v, q)
    column_sums = causal_attention(q, k).sum(dim=-2)  # (B, nh, L)
    n_recent = 4
    assert scores.shape == column_sums.shape
    assert (scores[..., : L - n_recent] - column_sums[..., : L - n_recent]).abs().max() < 1e-5
    assert torch.isinf(scores[..., L - n_recent :]).all()
    assert abs(column_sums.sum(dim=-1) - L).max() < 1e-9  # each query row gives out a total attention of 1


@pytest.mark.parametrize("recent_ratio", [0.0, 0.25, 0.5, 1.0])
def test_h2o_keeps_recent_plus_heavy_hitters(recent_ratio):
    L, C = 48, 16
    q, k, v = random_qkv(L=L, seed=1)
    cache = compress_layers(H2O(max_capacity_prompt=C, recent_ratio=recent_ratio), [(q, k, v)])
    n_recent = int(C * recent_ratio)
    column_sums = causal_attention(q, k).sum(dim=-2)
    heavy = top_positions(column_sums[..., : L - n_recent], C - n_recent)  # (B, nh, C - n_recent)
    recent = torch.arange(L - n_recent, L).expand(*heavy.shape[:2], n_recent)
    assert torch.equal(cache.positions(0), torch.cat((heavy, recent), dim=-1))
    check_gathered(cache, 0, k, v)
    if 0 < n_recent < C:
        # The recent tokens are kept because they are protected, not because they also scored high.
        assert not torch.equal(cache.positions(0), top_positions(column_sums, C))


# --- TOVA --------------------------------------------------------------------------------------------------

def test_tova_keeps_the_top_of_the_last_querys_head_averaged_attention():
    L, C = 40, 12
    q, k, v = random_qkv(B=2, H=4, L=L, seed=2)
    cache = compress_layers(TOVA(max_capacity_prompt=C), [(q, k, v)])
    last = causal_attention(q[:, :, -1:], k)[:, :, 0]  # (B, nh, L)
    expected = top_positions(last.mean(dim=1), C)  # (B, C)
    positions = cache.positions(0)
    assert torch.equal(positions, expected[:, None].expand_as(positions)), "every head keeps the same tokens"
    check_gathered(cache, 0, k, v)
    per_head = last.topk(C, dim=-1).indices.sort(dim=-1).values
    assert not torch.equal(per_head, positions), "per-head selections would differ: the average matters"


def test_tova_short_prompt_stays_whole():
    q, k, v = random_qkv(L=12)
    cache = compress_layers(TOVA(max_capacity_prompt=12), [(q, k, v)])
    assert torch.equal(cache.positions(0), torch.arange(12).expand(2, 3, 12))


# --- random ------------------------------------------------------------------------------------------------

def test_random_is_deterministic_per_seed_and_layer():
    L, C = 40, 10
    layers = [random_qkv(L=L, seed=s) for s in range(3)]

    def kept(seed):
        cache = compress_layers(RandomEviction(max_capacity_prompt=C, seed=seed), layers)
        assert all(cache.length(i) == C for i in range(3))
        return [cache.positions(i) for i in range(3)]

    a, b, other = kept(0), kept(0), kept(1)
    assert all(torch.equal(x, y) for x, y in zip(a, b)), "same seed, same selection"
    assert all(not torch.equal(x, y) for x, y in zip(a, other)), "another seed, another selection"
    assert not torch.equal(a[0], a[1]), "each layer draws its own scores"
    assert len({tuple(p) for p in a[0].reshape(-1, C).tolist()}) == 6, "and each (batch, head) its own"
    # Scores do not depend on the data: the same (seed, layer) gives the same scores on other tensors.
    r = RandomEviction(max_capacity_prompt=C, seed=5)
    assert torch.equal(r.score(2, *layers[0]), r.score(2, *layers[1]))


def test_random_is_roughly_uniform():
    """Over many draws every position is kept about C / L of the time: nothing is favoured."""
    L, C = 20, 5
    r = RandomEviction(max_capacity_prompt=C, seed=0)
    k = torch.zeros(1, 4000, L, 1)
    kept = torch.zeros(L)
    idx = r.score(0, k, k, k).topk(C, dim=-1).indices.flatten()
    kept.index_add_(0, idx, torch.ones(idx.numel()))
    assert (kept / 4000 - C / L).abs().max() < 0.03


# --- PyramidKV ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("C,W,n,L,expected", [
    # Pyramid branch: min 480 // 20 = 24, max 960 - 24 = 936, steps (936 - 24) // 5 = 182; budgets + W.
    (512, 32, 6, 2048, [968, 786, 604, 422, 240, 58]),
    # max_num 110 >= L - W = 107: the bottom layer keeps the whole prompt, max 107, min 112 - 107 = 5, steps 34.
    (64, 8, 4, 115, [115, 81, 47, 13]),
    # 2 (C - W) <= L but an uneven step: min 2, max 110, steps 108 // 3 = 36.
    (64, 8, 4, 400, [118, 82, 46, 10]),
    (64, 8, 4, 111, [64] * 4),  # C <= L < 2 (C - W): plain SnapKV in every layer
    (64, 8, 4, 64, [64] * 4),  # L == C: still the SnapKV branch (keeps everything)
    (64, 8, 4, 63, [63] * 4),  # L < C: whole
    (64, 8, 1, 400, [64]),  # one layer: no pyramid (the official code would divide by zero)
    # The official code's quirk, kept: max - min = 12 < n - 1 = 23 floors steps to 0, every layer keeps W + 12.
    (36, 30, 24, 79, [42] * 24),
])
def test_pyramidkv_budgets_follow_the_official_formula(C, W, n, L, expected):
    p = PyramidKV(window_size=W, max_capacity_prompt=C, num_layers=n)
    assert [p.keep_count(layer, L) for layer in range(n)] == expected


@pytest.mark.parametrize("C,W", [(512, 32), (256, 64), (64, 8), (36, 30)])
@pytest.mark.parametrize("n", [2, 6, 24, 32])
@pytest.mark.parametrize("L_over_C", [2.2, 4.0, 16.0])
def test_pyramidkv_budgets_decrease_and_average_to_capacity(C, W, n, L_over_C):
    L = max(int(C * L_over_C), 2 * (C - W))
    counts = [PyramidKV(window_size=W, max_capacity_prompt=C, num_layers=n).keep_count(i, L) for i in range(n)]
    assert all(a >= b for a, b in zip(counts, counts[1:]))
    assert counts[0] > counts[-1] or len(set(counts)) == 1  # flat only where the floored step is 0
    assert W <= counts[-1] and counts[0] <= L
    # Mean exactly C up to the floored step: each of the n - 1 steps loses less than one entry.
    assert C <= sum(counts) / n < C + (n - 1) / 2


def test_pyramidkv_selects_as_snapkv_with_the_layer_budget():
    n, C, W, L = 4, 24, 4, 70
    layers = [random_qkv(L=L, seed=10 + i) for i in range(n)]
    pyramid = PyramidKV(window_size=W, max_capacity_prompt=C, kernel_size=5, num_layers=n)
    cache = compress_layers(pyramid, layers)
    budgets = [pyramid.keep_count(i, L) for i in range(n)]
    assert len(set(budgets)) == n
    for i, (q, k, v) in enumerate(layers):
        snap = compress_layers(SnapKV(window_size=W, max_capacity_prompt=budgets[i], kernel_size=5), [(q, k, v)])
        assert cache.length(i) == budgets[i]
        assert torch.equal(cache.positions(i), snap.positions(0))
        assert torch.equal(cache.keys(i), snap.keys(0)) and torch.equal(cache.values(i), snap.values(0))


# --- Oracle ------------------------------------------------------------------------------------------------

def test_oracle_keeps_the_keys_the_future_attends_to_most():
    L, F, C = 40, 6, 10
    q, k, v = random_qkv(L=L, seed=3)
    future_q = torch.randn(2, 3, F, 16, generator=torch.Generator().manual_seed(4)) * 1.5
    oracle = Oracle(max_capacity_prompt=C)
    oracle.future_queries = {0: future_q}
    cache = compress_layers(oracle, [(q, k, v)])
    # Softmax over the L prompt keys only, summed over the future queries.
    attn = (future_q.double() @ k.double().transpose(-1, -2) / 4.0).softmax(dim=-1)  # (B, nh, F, L)
    assert torch.equal(cache.positions(0), top_positions(attn.sum(dim=-2), C))
    check_gathered(cache, 0, k, v)
    # What the prompt's own queries would pick (SnapKV-like) is something else: the future really decides.
    assert not torch.equal(cache.positions(0), top_positions(causal_attention(q[:, :, -F:], k).sum(-2), C))


def test_oracle_without_future_queries_says_what_to_do():
    q, k, v = random_qkv(L=20)
    with pytest.raises(ValueError, match="oracle_future_queries"):
        compress_layers(Oracle(max_capacity_prompt=8), [(q, k, v)])
    oracle = Oracle(max_capacity_prompt=8)
    oracle.future_queries = {0: torch.zeros(2, 3, 4, 8)}  # wrong head size
    with pytest.raises(ValueError, match="expected"):
        compress_layers(oracle, [(q, k, v)])


@pytest.fixture(scope="module")
def model(reference_checkpoint):
    return Pythia.from_pretrained(reference_checkpoint("tiny", 0.25, True)[1]).for_inference()


@torch.no_grad()
def test_oracle_future_queries_match_step_by_step_decoding(model):
    """The helper's queries equal those the model computes when the future tokens are fed one at a time
    through a cache, captured at the fused QKV projection and rotated by hand at their positions."""
    c = model.config
    B, L, F = 2, 20, 5
    prompt, future = random_ids(model, B, L, 0), random_ids(model, B, F, 1)
    got = oracle_future_queries(model, prompt, future)
    assert sorted(got) == list(range(c.num_hidden_layers))

    captured = {i: [] for i in range(c.num_hidden_layers)}

    def hook(layer):
        def capture(module, inputs, qkv):  # qkv (B, 1, 3 * hidden), interleaved per head: [q_h, k_h, v_h]
            q = qkv.view(B, 1, c.num_attention_heads, 3, c.head_size)[..., 0, :].transpose(1, 2)  # (B, nh, 1, hs)
            captured[layer].append(q.clone())  # a view would be rotated in place by the model afterwards
        return capture

    cache = model.new_cache(B)
    model(prompt, cache=cache)
    handles = [block.attention.query_key_value.register_forward_hook(hook(i)) for i, block in enumerate(model.layers)]
    try:
        for t in range(F):
            model(future[:, t : t + 1], cache=cache)
    finally:
        for h in handles:
            h.remove()
    for layer in range(c.num_hidden_layers):
        expected = rotary_by_hand(torch.cat(captured[layer], dim=2), range(L, L + F), c)  # (B, nh, F, hs)
        assert got[layer].shape == (B, c.num_attention_heads, F, c.head_size)
        assert (got[layer] - expected).abs().max() < 1e-5


@torch.no_grad()
def test_oracle_end_to_end_selects_with_the_real_future(model):
    L, F, C = 30, 8, 12
    prompt, future = random_ids(model, 1, L, 2), random_ids(model, 1, F, 3)
    full = model.new_cache(1)
    model(prompt, cache=full)
    oracle = Oracle(max_capacity_prompt=C)
    oracle.future_queries = oracle_future_queries(model, prompt, future)
    cache = model.new_cache(1, oracle)
    model(prompt, cache=cache)
    for i in range(model.config.num_hidden_layers):
        future_q = oracle.future_queries[i].double()
        attn = (future_q @ full.keys(i).double().transpose(-1, -2) / math.sqrt(model.config.head_size)).softmax(-1)
        assert torch.equal(cache.positions(i), top_positions(attn.sum(dim=-2), C))
    # Decoding the future tokens through the compressed cache works.
    for t in range(F):
        assert torch.isfinite(model(future[:, t : t + 1], cache=cache)).all()
    assert cache.seen == L + F and cache.length(0) == C + F


# --- every policy through the model ------------------------------------------------------------------------

POLICIES = {
    "streaming_llm": lambda n: StreamingLLM(n_sink=4, max_capacity_prompt=16),
    "h2o": lambda n: H2O(max_capacity_prompt=16, recent_ratio=0.5),
    "tova": lambda n: TOVA(max_capacity_prompt=16),
    "random": lambda n: RandomEviction(max_capacity_prompt=16, seed=1),
    "pyramidkv": lambda n: PyramidKV(window_size=4, max_capacity_prompt=16, kernel_size=3, num_layers=n),
    "oracle": lambda n: Oracle(max_capacity_prompt=16),
}


@pytest.mark.parametrize("name", POLICIES)
@torch.no_grad()
def test_policy_end_to_end_then_decoding(model, name):
    L, steps = 40, 4
    prompt = random_ids(model, 1, L, 5)
    policy = POLICIES[name](model.config.num_hidden_layers)
    if name == "oracle":
        policy.future_queries = oracle_future_queries(model, prompt, random_ids(model, 1, 6, 6))
    cache = model.new_cache(1, policy)
    logits = model(prompt, cache=cache)
    keep = [policy.keep_count(i, L) for i in range(model.config.num_hidden_layers)]
    assert all(k < L for k in keep)
    for i, k in enumerate(keep):
        positions = cache.positions(i)
        assert positions.shape == (1, model.config.num_attention_heads, k)
        assert (positions.diff(dim=-1) > 0).all() and positions.min() >= 0 and positions.max() < L
    for t in range(steps):
        logits = model(logits[:, -1:].argmax(-1), cache=cache)
        assert torch.isfinite(logits).all()
    assert cache.seen == L + steps
    for i, k in enumerate(keep):
        assert cache.length(i) == k + steps
        new = cache.positions(i)[..., -steps:]  # the decoded tokens, at their own positions, in every head
        assert torch.equal(new, torch.arange(L, L + steps).expand_as(new))
    # And through generate(), which reports what layer 0 kept.
    out = generate(model, prompt[0].tolist(), max_new_tokens=3, compressor=policy)
    assert len(out.tokens) == 3 and out.kept_after_prefill == keep[0]


# --- settings, registry, command line ----------------------------------------------------------------------

@pytest.mark.parametrize("make,message", [
    (lambda: StreamingLLM(n_sink=-1), "n_sink must be >= 0"),
    (lambda: StreamingLLM(n_sink=16, max_capacity_prompt=16), "n_sink.*smaller than max_capacity_prompt"),
    (lambda: H2O(recent_ratio=1.5), r"recent_ratio must be in \[0, 1\]"),
    (lambda: H2O(max_capacity_prompt=0), "max_capacity_prompt must be >= 1"),
    (lambda: TOVA(max_capacity_prompt=0), "max_capacity_prompt must be >= 1"),
    (lambda: RandomEviction(seed=-1), "seed must be >= 0"),
    (lambda: RandomEviction(max_capacity_prompt=0), "max_capacity_prompt must be >= 1"),
    (lambda: PyramidKV().keep_count(0, 600), "need the model's depth"),
    (lambda: PyramidKV(num_layers=0), "num_layers"),
    (lambda: PyramidKV(num_layers=4).for_model(PythiaConfig(num_hidden_layers=6)), "the model has 6 layers"),
    (lambda: KnormPress(skip_layers=(0, 6)).for_model(PythiaConfig(num_hidden_layers=6)), r"skip_layers \[6\]"),
    (lambda: PyramidKV(num_layers=6, beta=0), "beta must be >= 1"),
    (lambda: PyramidKV(num_layers=6, window_size=64, max_capacity_prompt=64), "smaller than max_capacity_prompt"),
    (lambda: PyramidKV(num_layers=6, kernel_size=4), "odd"),
    (lambda: Oracle(max_capacity_prompt=0), "max_capacity_prompt must be >= 1"),
])
def test_invalid_policy_settings_say_what_is_allowed(make, message):
    with pytest.raises(ValueError, match=message):
        make()


def test_registry_and_labels():
    # the first policies, in the CLI's order; the others follow, one file each (tested in their own files)
    assert dict(list(COMPRESSORS.items())[:9]) == {
        "none": NoCompression, "knorm": KnormPress, "snapkv": SnapKV, "streaming_llm": StreamingLLM, "h2o": H2O,
        "tova": TOVA, "random": RandomEviction, "pyramidkv": PyramidKV, "oracle": Oracle}
    assert StreamingLLM().label == "streaming_llm_sink4_c512"
    assert H2O().label == "h2o_c512_recent0.5"
    assert TOVA(256).label == "tova_c256"
    assert RandomEviction(seed=3).label == "random_c512_seed3"
    assert PyramidKV(num_layers=6).label == "pyramidkv_w32_c512_k5_avgpool_beta20_layers6"
    oracle = Oracle(128)
    oracle.future_queries = {0: torch.zeros(1, 1, 1, 1)}
    assert oracle.label == "oracle_c128" and oracle.settings() == {"max_capacity_prompt": 128}


@pytest.mark.parametrize("options,expected", [
    ("--compressor streaming_llm --n-sink 2 --max-capacity-prompt 64", StreamingLLM(n_sink=2, max_capacity_prompt=64)),
    ("--compressor h2o --recent-ratio 0.25 --max-capacity-prompt 64", H2O(max_capacity_prompt=64, recent_ratio=0.25)),
    ("--compressor tova --max-capacity-prompt 64", TOVA(max_capacity_prompt=64)),
    ("--compressor random --seed 3", RandomEviction(seed=3)),
    ("--compressor pyramidkv --window-size 8 --max-capacity-prompt 64 --kernel-size 3 --beta 10",
     PyramidKV(window_size=8, max_capacity_prompt=64, kernel_size=3, beta=10)),  # num_layers: from the model
    ("--compressor knorm --compression-ratio 0.25 --skip-layers 0,1", KnormPress(0.25, skip_layers=(0, 1))),
    ("--compressor snapkv --pooling maxpool", SnapKV(pooling="maxpool")),
])
def test_cli_options_build_each_policy(tiny_checkpoint, options, expected):
    from minipythia.cli import add_compressor_args, add_model_args, compressor_from_args

    parser = argparse.ArgumentParser()
    add_model_args(parser)
    argv = ["--model", str(tiny_checkpoint), *options.split()]
    add_compressor_args(parser, argv)
    args = parser.parse_args(argv)
    assert compressor_from_args(args) == expected
    assert args.model == str(tiny_checkpoint)  # left as given


@pytest.mark.parametrize("options,message", [
    ("--compressor knorm --window-size 8", "--window-size does nothing with --compressor knorm"),
    ("--compressor snapkv --max-capacity-prompt 256.5", "--max-capacity-prompt takes an int"),
    ("--compressor snapkv --pooling mean", "pooling must be one of 'avgpool', 'maxpool'"),
    ("--compressor oracle", "the oracle needs the queries of the tokens that come after the prompt"),
])
def test_cli_options_that_cannot_apply_are_errors(options, message):
    from minipythia.cli import add_compressor_args, compressor_from_args

    parser = argparse.ArgumentParser()
    add_compressor_args(parser, options.split())
    with pytest.raises(ValueError, match=message):
        compressor_from_args(parser.parse_args(options.split()))


def run_generate(*args):
    return subprocess.run([sys.executable, "-m", "minipythia.generate", *args], capture_output=True, text=True,
                          cwd=ROOT, timeout=120, env={**os.environ, "HF_HUB_OFFLINE": "1"})


def test_cli_generates_with_a_new_policy(tiny_checkpoint):
    prompt = "the quick brown fox jumps over a lazy dog while seven old men read"
    r = run_generate("--model", str(tiny_checkpoint), "--prompt", prompt, "--max-new-tokens", "4", "--ignore-eos",
                     "--stats", "--compressor", "streaming_llm", "--n-sink", "2", "--max-capacity-prompt", "4")
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith(prompt) and "streaming_llm_sink2_c4" in r.stderr


def test_cli_refuses_the_oracle(tiny_checkpoint):
    r = run_generate("--model", str(tiny_checkpoint), "--prompt", "hi", "--compressor", "oracle")
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert "the oracle needs the queries of the tokens that come after the prompt" in r.stderr
