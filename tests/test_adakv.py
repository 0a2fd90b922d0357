"""AdaKV (Feng et al. 2024): head-wise budgets over a scorer, on tensors only.

The selection is checked against a test-side transcription of NVIDIA kvpress's AdaKVPress, then by its
rules written out by hand (the safeguard, the layer's total, uneven heads, the uniform and global
extremes), then the wrapper's own contract (the scorer's scores, the budget, the settings it refuses).
"""

from dataclasses import dataclass

import pytest
import torch

from minipythia import COMPRESSORS, KnormPress, SnapKV, build_compressor
from minipythia.compressors.adakv import AdaKV, adaptive_selection
from minipythia.compressors.base import Compressor

pytestmark = pytest.mark.usefixtures("single_thread")


def kvpress_selection(scores, keep, alpha):
    """The kept mask (B, nh, L) as kvpress computes it, written out from NVIDIA kvpress
    `kvpress/presses/adakv_press.py` (AdaKVPress.compress): n_kept per head is the wrapped press's budget
    (here keep), the top int(n_kept * alpha_safeguard) entries of each head have their score raised to
    the dtype's largest finite value, and the nh * (L - n_kept) lowest scores over the whole layer (per
    batch row) are pruned; everything else is kept."""
    B, H, L = scores.shape
    scores = scores.clone()
    n_safe = int(keep * alpha)
    safe = torch.topk(scores, n_safe, dim=-1).indices
    scores.scatter_(-1, safe, torch.finfo(scores.dtype).max)
    n_pruned = H * (L - keep)
    pruned = torch.topk(-scores.reshape(B, -1), n_pruned, dim=1).indices
    kept = torch.ones(B, H * L, dtype=torch.bool)
    kept.scatter_(1, pruned, False)
    return kept.reshape(B, H, L)


def random_scores(B, H, L, seed, uneven=True, window=0):
    """Continuous (float64) scores without ties; heads on different scales when uneven; the last `window`
    entries of every head at +inf, as SnapKV scores its window."""
    g = torch.Generator().manual_seed(seed)
    scores = torch.rand(B, H, L, generator=g, dtype=torch.float64)
    if uneven:
        scores = scores * torch.exp(2 * torch.randn(B, H, 1, generator=g, dtype=torch.float64))
    if window:
        scores[..., L - window:] = float("inf")
    return scores


def own_top(scores, n):
    """Each head's own top n entries, as a mask."""
    mask = torch.zeros_like(scores, dtype=torch.bool)
    return mask.scatter_(-1, scores.topk(n, dim=-1).indices, True) if n else mask


CASES = [(B, H, L) for B in (1, 3) for H in (1, 4, 8) for L in (5, 37, 128)]


@pytest.mark.parametrize("B,H,L", CASES)
@pytest.mark.parametrize("alpha", [0.0, 0.2, 0.5, 0.9, 1.0])
def test_select_matches_kvpress(B, H, L, alpha):
    for seed, keep in enumerate(sorted({1, 2, L // 3, L // 2, L - 1, L})):
        scores = random_scores(B, H, L, seed=1000 * L + seed)
        comp = AdaKV(max_capacity_prompt=keep, scorer="knorm", alpha_safeguard=alpha)  # snapkv needs C > 32
        assert comp.keep_count(0, L) == keep
        assert torch.equal(comp.select(0, scores, keep), kvpress_selection(scores, keep, alpha))


@pytest.mark.parametrize("alpha", [0.0, 0.2, 1.0])
def test_select_matches_kvpress_with_an_always_kept_window(alpha):
    """SnapKV's window scores +inf; kvpress keeps it in every head (inf stays above the safeguard)."""
    B, H, L, W, keep = 2, 6, 90, 8, 30
    scores = random_scores(B, H, L, seed=7, window=W)
    kept = AdaKV(max_capacity_prompt=keep, scorer="knorm", alpha_safeguard=alpha).select(3, scores, keep)
    assert torch.equal(kept, kvpress_selection(scores, keep, alpha))
    assert kept[..., L - W:].all()


@pytest.mark.parametrize("alpha", [0.0, 0.2, 0.5, 1.0])
@pytest.mark.parametrize("keep", [1, 10, 33, 64])
def test_rules_by_hand(alpha, keep):
    B, H, L = 3, 8, 64
    scores = random_scores(B, H, L, seed=keep)
    kept = adaptive_selection(scores, keep, alpha)
    assert kept.shape == (B, H, L) and kept.dtype == torch.bool
    counts = kept.sum(dim=-1)  # (B, nh)
    n_safe = int(keep * alpha)
    # the safeguard: each head keeps at least its own top int(keep * alpha)
    assert (counts >= n_safe).all()
    assert (kept | ~own_top(scores, n_safe)).all()
    # the layer's budget, per batch row
    assert (counts.sum(dim=-1) == H * keep).all()
    # each head keeps a top set of its own scores: every kept entry outscores every evicted one
    lowest_kept = scores.masked_fill(~kept, float("inf")).amin(dim=-1)
    highest_evicted = scores.masked_fill(kept, float("-inf")).amax(dim=-1)
    assert (lowest_kept > highest_evicted).all()


def test_heads_on_a_larger_scale_take_more():
    B, H, L, keep, alpha = 2, 4, 50, 10, 0.2
    scores = random_scores(B, H, L, seed=3, uneven=False)
    scores[:, 1] += 10.0  # head 1 outscores every entry of the others
    kept = adaptive_selection(scores, keep, alpha)
    counts = kept.sum(dim=-1)
    n_safe = int(keep * alpha)  # 2
    # the others keep their safeguard only; head 1 takes the rest of the layer's budget
    expected = torch.full((B, H), n_safe)
    expected[:, 1] = H * keep - (H - 1) * n_safe
    assert torch.equal(counts, expected)
    assert torch.equal(kept[:, [0, 2, 3]], own_top(scores[:, [0, 2, 3]], n_safe))
    # more than a whole head: the surplus goes to the next best scores, still nh * keep in all
    scores[:, 2] += 5.0
    kept = adaptive_selection(scores, 20, alpha)
    counts = kept.sum(dim=-1)
    assert (counts[:, 1] == L).all() and (counts[:, 2] == H * 20 - L - 2 * int(20 * alpha)).all()
    assert (counts[:, [0, 3]] == int(20 * alpha)).all()
    assert (counts.sum(dim=-1) == H * 20).all()


def test_alpha_one_is_uniform_and_alpha_zero_is_global():
    B, H, L, keep = 2, 5, 40, 12
    scores = random_scores(B, H, L, seed=11)
    assert torch.equal(adaptive_selection(scores, keep, 1.0), own_top(scores, keep))
    top = scores.reshape(B, -1).topk(H * keep, dim=-1).indices
    glob = torch.zeros(B, H * L, dtype=torch.bool).scatter_(1, top, True).reshape(B, H, L)
    assert torch.equal(adaptive_selection(scores, keep, 0.0), glob)
    assert not (adaptive_selection(scores, keep, 0.0).sum(-1) == keep).all()  # uneven scales: uneven counts


def test_whole_prompt_and_ties():
    scores = random_scores(2, 3, 9, seed=5)
    comp = AdaKV(max_capacity_prompt=16, scorer="knorm")
    keep = comp.keep_count(0, 9)
    assert keep == 9 and comp.select(0, scores, keep).all()
    # equal scores: deterministic, and still the exact budget with the safeguard
    flat = torch.zeros(2, 3, 9)
    kept = adaptive_selection(flat, 4, 0.5)
    assert torch.equal(kept, adaptive_selection(flat, 4, 0.5))
    assert (kept.sum(-1) >= 2).all() and (kept.sum(dim=(1, 2)) == 12).all()


def random_qkv(B, H, L, D, seed):
    g = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(B, H, L, D, generator=g) for _ in range(3))


@pytest.mark.parametrize("scorer,reference", [("snapkv", SnapKV(max_capacity_prompt=40)), ("knorm", KnormPress())])
def test_score_is_the_scorers(scorer, reference):
    keys, values, queries = random_qkv(2, 4, 70, 16, seed=1)
    comp = AdaKV(max_capacity_prompt=40, scorer=scorer)
    assert comp.inner == reference
    assert torch.equal(comp.score(2, keys, values, queries), reference.score(2, keys, values, queries))


def test_registered_and_declared():
    comp = build_compressor("adakv")
    assert COMPRESSORS["adakv"] is AdaKV and type(comp) is AdaKV
    assert (comp.max_capacity_prompt, comp.scorer, comp.alpha_safeguard) == (512, "snapkv", 0.2)
    assert AdaKV.headwise and comp.headwise_at(3) and comp.keep_count(0, 2000) == 512
    assert comp.label == "adakv_c512_snapkv_a0.2"
    with pytest.raises(ValueError, match="prefill"):
        comp.decode_queries()


@pytest.mark.parametrize("settings,match", [
    ({"alpha_safeguard": -0.1}, "alpha_safeguard"),
    ({"alpha_safeguard": 1.5}, "alpha_safeguard"),
    ({"scorer": "adakv"}, "own scorer"),
    ({"scorer": "none"}, "keeps every entry"),
    ({"scorer": "no_such_policy"}, "registered policy"),
    ({"scorer": "think"}, "key channels"),
    ({"scorer": "merging"}, "values"),
    ({"max_capacity_prompt": 0}, "max_capacity_prompt"),
])
def test_bad_settings(settings, match):
    with pytest.raises(ValueError, match=match):
        AdaKV(**settings)


def test_refuses_headwise_scorers():
    @dataclass
    class HeadwiseScorer(Compressor):  # not registered: only its class is asked about
        name = "headwise_scorer"
        headwise = True

    assert "head" in AdaKV().refused_scorer(HeadwiseScorer)
    assert AdaKV().refused_scorer(SnapKV) is None
