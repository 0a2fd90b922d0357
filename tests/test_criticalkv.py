"""CriticalKV and CriticalAdaKV: against transcriptions of the official selections (kvpress
`criticalkv_press.py`, the authors' code), by hand, end to end, and their settings.

The transcriptions work in float64 with kvpress's own marker for the stages (the dtype's largest finite
value); every comparison of kept sets first checks that no near-tie sits at a cut. The scorers' scores they
get are ours on kvpress's scale: SnapKV's votes divided by the window (kvpress averages them, we sum them;
`test_snapkv_votes_are_kvpress_votes_times_the_window` checks that this is the only difference).
"""

from types import SimpleNamespace

import pytest
import torch
from conftest import random_ids
from minipythia import COMPRESSORS, KVCache, Prefill, Prompt, Pythia, PythiaConfig, SnapKV, build_compressor
from minipythia.compressors.adakv import AdaKV, adaptive_selection
from minipythia.compressors.criticalkv import CriticalAdaKV, CriticalKV
from minipythia.compressors import criticalkv as criticalkv_module

pytestmark = pytest.mark.usefixtures("single_thread")

REL_GAP = 1e-4


def gap_ok(upper: torch.Tensor, lower: torch.Tensor) -> torch.Tensor:
    """Whether upper is clearly above lower (both may be +inf or the marker: then they are not a tie)."""
    big = torch.finfo(torch.float64).max
    both_top = (upper >= big) & (lower >= big)
    scale = torch.maximum(upper.abs(), lower.abs()).clamp(min=1e-12).nan_to_num(posinf=1.0)
    return both_top | ((upper - lower) > REL_GAP * scale)  # relative: float32 scores round at ~1e-7


def kvpress_criticalkv_kept(scores, values, dense_weight, n_kept, first_stage_ratio, epsilon):
    """A transcription of kvpress/presses/criticalkv_press.py, CriticalKVPress.score followed by
    ScorerPress.compress's per-head top-n_kept (kvpress/presses/scorer_press.py), with n_kept given
    directly (kvpress: int(L * (1 - compression_ratio))). scores (B, nh, L) from the wrapped press,
    values (B, nh, L, hs), dense_weight the layer's output projection weight (hidden, hidden), as
    nn.Linear stores it (o_proj.weight). Returns the kept positions (B, nh, n_kept) in position order."""
    scores, values, w = scores.double(), values.double(), dense_weight.double()
    B, H, L, hs = values.shape
    budget = int(n_kept * first_stage_ratio)  # selection_budget
    first = scores.topk(budget, dim=-1).indices
    wo = w.transpose(0, 1).reshape(H, hs, w.size(0))  # Wo = o_proj.weight.T viewed (heads, head_dim, hidden)
    norm = torch.stack([torch.norm(values[:, h] @ wo[h], p=1, dim=-1) for h in range(H)], dim=1)  # vwl1norm
    final = (scores + epsilon) * norm
    final.scatter_(-1, first, torch.finfo(final.dtype).max)
    # No near-ties at the first stage's cut, nor at the final one.
    ranked = scores.sort(dim=-1, descending=True).values
    if 0 < budget < L:
        assert gap_ok(ranked[..., budget - 1], ranked[..., budget]).all(), "near-tie at stage 1: another seed"
    ranked = final.sort(dim=-1, descending=True).values
    assert gap_ok(ranked[..., n_kept - 1], ranked[..., n_kept]).all(), "near-tie at the cut: another seed"
    return final.topk(n_kept, dim=-1).indices.sort(dim=-1).values


def kvpress_snapkv_scores(queries, keys, window_size, kernel_size):
    """A transcription of kvpress/presses/snapkv_press.py, SnapKVPress.score without GQA (float64): the last
    window_size queries' causal softmax attention on the earlier keys, *averaged* over the window, avg-pooled,
    and the window padded with the largest score of the whole tensor."""
    q, k = queries.double(), keys.double()
    L, W, d = k.size(2), window_size, k.size(3)
    logits = q[:, :, -W:] @ k.transpose(-1, -2) / d ** 0.5  # (B, nh, W, L)
    logits = logits + torch.full_like(logits, float("-inf")).triu(diagonal=L - W + 1)
    attn = logits.softmax(dim=-1)[..., : L - W]
    scores = torch.nn.functional.avg_pool1d(attn.mean(dim=-2), kernel_size, padding=kernel_size // 2, stride=1)
    return torch.nn.functional.pad(scores, (0, W), value=scores.max().item())


def on_kvpress_scale(policy, scores):
    """Our scorer's scores as kvpress's scorer gives them: SnapKV's summed votes divided by the window."""
    return scores.double() / policy.window_size if isinstance(policy, SnapKV) else scores.double()


def fake_model(weights):
    """What prepare() reads of a model: layers[i].attention.dense.weight."""
    return SimpleNamespace(layers=[SimpleNamespace(attention=SimpleNamespace(dense=SimpleNamespace(weight=w)))
                                   for w in weights])


def compress_one(compressor, q, k, v, weight):
    B, H, _, D = k.shape
    config = PythiaConfig(vocab_size=8, hidden_size=H * D, num_hidden_layers=1, num_attention_heads=H,
                          intermediate_size=8)
    model = fake_model([weight])
    compressor.prepare(model, Prompt(model, torch.zeros(B, k.size(2), dtype=torch.long)))
    cache = KVCache(config, B, compressor=compressor)
    cache.append(0, k, v)
    cache.compress(0, q)
    return cache


def random_case(seed, B=2, H=3, L=90, D=16):
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(B, H, L, D, generator=g) * 1.5 for _ in range(3))
    weight = torch.randn(H * D, H * D, generator=g) / (H * D) ** 0.5
    return q, k, v, weight


@pytest.mark.parametrize("scorer", ["snapkv", "tova", "knorm", "h2o"])
@pytest.mark.parametrize("ratio", [0.0, 0.3, 0.5, 1.0])
def test_matches_kvpress_transcription_on_random_tensors(scorer, ratio):
    C = 40
    q, k, v, weight = random_case(seed=1)
    ckv = CriticalKV(max_capacity_prompt=C, scorer=scorer, first_stage_ratio=ratio)
    cache = compress_one(ckv, q, k, v, weight)
    # The scorer alone, built as CriticalKV builds it (C when it has that setting), scores the same entries.
    alone = build_compressor(scorer, {"max_capacity_prompt": C} if scorer != "knorm" else {})
    expected = kvpress_criticalkv_kept(on_kvpress_scale(alone, alone.score(0, k, v, q)), v, weight, C, ratio,
                                       ckv.epsilon)
    assert torch.equal(cache.positions(0), expected)
    assert cache.length(0) == C


def test_snapkv_votes_are_kvpress_votes_times_the_window():
    """Ours sum the window's votes, kvpress's average them: the same scores up to the factor W, but the
    window, which ours scores +inf (always kept) and kvpress the largest score (kept at its first stage)."""
    q, k, _, _ = random_case(seed=4)
    snap = SnapKV(max_capacity_prompt=40, window_size=16)
    ours, theirs = snap.score(0, k, k, q), kvpress_snapkv_scores(q, k, 16, snap.kernel_size)
    assert torch.allclose(on_kvpress_scale(snap, ours)[..., :-16], theirs[..., :-16], rtol=1e-5, atol=1e-9)
    assert (ours[..., -16:] == float("inf")).all()


def test_epsilon_applies_on_kvpress_scale():
    """With snapkv, epsilon is added to the window's mean vote, as the official code does: adding it to our
    summed votes instead (epsilon / W on kvpress's scale) keeps another set here."""
    C = 128
    q, k, v, weight = random_case(seed=1, L=300)
    ckv = CriticalKV(max_capacity_prompt=C)
    kept = compress_one(ckv, q, k, v, weight).positions(0)
    kvpress = on_kvpress_scale(ckv.inner, ckv.inner.score(0, k, v, q))
    assert torch.equal(kept, kvpress_criticalkv_kept(kvpress, v, weight, C, 0.5, ckv.epsilon))
    summed_eps = kvpress_criticalkv_kept(kvpress, v, weight, C, 0.5, ckv.epsilon / ckv.inner.window_size)
    assert not torch.equal(kept, summed_eps)


def test_first_stage_ratio_one_is_the_scorers_own_selection():
    C = 40
    q, k, v, weight = random_case(seed=2)
    ours = compress_one(CriticalKV(max_capacity_prompt=C, first_stage_ratio=1.0), q, k, v, weight)
    snap = compress_one(SnapKV(max_capacity_prompt=C), q, k, v, weight)
    assert torch.equal(ours.positions(0), snap.positions(0))
    # And with ratio 0.5 it is not (the refinement changes something here).
    half = compress_one(CriticalKV(max_capacity_prompt=C, first_stage_ratio=0.5), q, k, v, weight)
    assert not torch.equal(half.positions(0), snap.positions(0))


def test_larger_projected_value_norm_is_preferred_after_the_first_stage():
    """One head, 6 entries, C = 3, first stage int(3 * 1/3) = 1 entry; W_o = identity, so the projected
    norm is the value's L1 norm."""
    L, D = 6, 4
    ckv = CriticalKV(max_capacity_prompt=3, scorer="knorm", first_stage_ratio=1 / 3, epsilon=0.0)
    fixed = torch.tensor([5.0, 1.0, 1.0, 1.0, 1.0, 0.5])
    ckv.inner.score = lambda layer, k, v, q: fixed.expand(1, 1, L).clone()  # the scorer's scores, by hand
    norms = torch.tensor([0.1, 1.0, 3.0, 2.0, 4.0, 9.0])  # L1 norms of the values
    v = torch.zeros(1, 1, L, D)
    v[..., 0] = norms
    k = q = torch.randn(1, 1, L, D)
    cache = compress_one(ckv, q, k, v, torch.eye(D))
    # Entry 0: the scorer's best (stage 1) despite its tiny norm; then 0.5 * 9 = 4.5 and 1 * 4 = 4 beat
    # 1 * 3 = 3 (entry 2), which beats entries 1 and 3.
    assert cache.positions(0).flatten().tolist() == [0, 4, 5]
    # With no first stage, entry 0 scores 5 * 0.1 = 0.5 and loses to entry 2 (3).
    ckv.first_stage_ratio = 0.0
    assert compress_one(ckv, q, k, v, torch.eye(D)).positions(0).flatten().tolist() == [2, 4, 5]


def test_output_projection_orientation():
    """The projected norm is || v_h @ W[:, h*hs:(h+1)*hs].T ||_1: head h's share of dense(y) = y @ W.T."""
    B, H, L, D = 1, 2, 5, 3
    g = torch.Generator().manual_seed(3)
    v = torch.randn(B, H, L, D, generator=g)
    dense = torch.nn.Linear(H * D, H * D)
    ckv = CriticalKV(max_capacity_prompt=2, scorer="knorm")
    model = fake_model([dense.weight])
    ckv.prepare(model, Prompt(model, torch.zeros(B, L, dtype=torch.long)))
    got = ckv.projected_norm(0, v)
    for h in range(H):
        y = torch.zeros(B, L, H * D)
        y[..., h * D:(h + 1) * D] = v[:, h]
        expected = (dense(y) - dense.bias).abs().sum(dim=-1)
        assert torch.allclose(got[:, h], expected, atol=1e-5)


@pytest.mark.parametrize("block", [1, 3 * 2 * 7 * 24, 10**9])  # one head at a time, some heads (3 of 8), all
def test_projected_norm_in_head_blocks_is_bitwise_the_per_head_norm(monkeypatch, block):
    """Heads are projected a block at a time (PROJECTION_BLOCK); each head's norm keeps the bits of its own product."""
    B, H, L, D = 2, 8, 7, 3
    g = torch.Generator().manual_seed(5)
    v, w = torch.randn(B, H, L, D, generator=g), torch.randn(H * D, 24, generator=g)
    monkeypatch.setattr(criticalkv_module, "PROJECTION_BLOCK", block)
    ckv = CriticalKV(max_capacity_prompt=2, scorer="knorm")
    model = fake_model([w.t()])
    ckv.prepare(model, Prompt(model, torch.zeros(B, L, dtype=torch.long)))
    per_head = torch.stack([(v[:, h] @ w[h * D:(h + 1) * D]).abs().sum(dim=-1) for h in range(H)], dim=1)
    assert torch.equal(ckv.projected_norm(0, v), per_head)


@pytest.fixture(scope="module")
def model(reference_checkpoint):
    return Pythia.from_pretrained(reference_checkpoint("tiny", 0.25, True)[1]).for_inference()


@torch.no_grad()
def test_end_to_end_matches_transcription_and_decodes(model):
    L, C, F = 90, 40, 5
    ids = random_ids(model, 1, L, 4)
    rec = Prefill.record(model, ids)
    ckv = CriticalKV(max_capacity_prompt=C)
    cache = model.new_cache(1, compressor=ckv)
    model(ids, cache=cache)  # the prefill calls prepare
    snap = SnapKV(max_capacity_prompt=C)
    for i, block in enumerate(model.layers):
        k, v, q = rec.keys[i], rec.values[i], rec.queries[i]
        expected = kvpress_criticalkv_kept(on_kvpress_scale(snap, snap.score(i, k, v, q)), v,
                                           block.attention.dense.weight, C, ckv.first_stage_ratio, ckv.epsilon)
        assert torch.equal(cache.positions(i), expected)
    # A replay of the recorded prefill leaves the same cache.
    replayed = rec.replay(model, CriticalKV(max_capacity_prompt=C))
    for i in range(model.config.num_hidden_layers):
        assert torch.equal(replayed.positions(i), cache.positions(i))
    # Decoding continues after the prefill.
    for t in range(F):
        assert torch.isfinite(model(random_ids(model, 1, 1, 10 + t), cache=cache)).all()
    assert cache.seen == L + F and cache.length(0) == C + F


def test_cannot_compress_during_decoding(model):
    with pytest.raises(ValueError, match="criticalkv cannot compress during decoding"):
        model.new_cache(1, compressor=CriticalKV(max_capacity_prompt=40), decode_interval=8)


def test_score_without_prepare_raises():
    q, k, v, _ = random_case(seed=5)
    with pytest.raises(ValueError, match="prepare"):
        CriticalKV(max_capacity_prompt=40).score(0, k, v, q)


@pytest.mark.parametrize("settings", [
    dict(first_stage_ratio=1.5), dict(first_stage_ratio=-0.1), dict(epsilon=-1.0), dict(epsilon=float("nan")),
    dict(epsilon=float("inf")), dict(max_capacity_prompt=0), dict(scorer="none"), dict(scorer="criticalkv"),
    dict(scorer="think"), dict(scorer="merging"), dict(scorer="no_such_policy"),
    dict(max_capacity_prompt=16),  # snapkv's default window (32) does not fit
])
def test_bad_settings_raise(settings):
    with pytest.raises(ValueError):
        CriticalKV(**settings)


def test_headwise_scorers_are_refused():
    headwise = [name for name, cls in COMPRESSORS.items() if cls.headwise]
    for name in headwise:
        with pytest.raises(ValueError, match="budgets of their own"):
            CriticalKV(scorer=name)


def test_registered_with_defaults():
    ckv = build_compressor("criticalkv")
    assert type(ckv) is CriticalKV and ckv.name == "criticalkv"
    assert (ckv.max_capacity_prompt, ckv.scorer, ckv.first_stage_ratio, ckv.epsilon) == (512, "snapkv", 0.5, 1e-4)
    assert ckv.label == "criticalkv_c512_snapkv_fs0.5_eps0.0001"


# --- CriticalAdaKV ----------------------------------------------------------------------------------------

def kvpress_criticaladakv_kept(scores, values, dense_weight, n_kept, alpha, first_stage_ratio, epsilon):
    """A transcription of kvpress/presses/criticalkv_press.py, CriticalAdaKVPress.compress, for one batch row
    (kvpress adds the head counts of all rows together; a row alone is its own batch), float64. scores
    (nh, L) from the wrapped press, values (nh, L, hs), dense_weight the layer's (hidden, hidden). Returns the
    kept mask (nh, L) and the head budgets (nh,)."""
    big = torch.finfo(torch.float64).max
    scores, values, w = scores.double().clone(), values.double(), dense_weight.double()
    H, L, hs = values.shape
    n_safe = int(n_kept * alpha)
    safe = scores.topk(n_safe, dim=-1).indices
    scores.scatter_(-1, safe, big)  # kvpress marks the safeguard in place: the stages below see it too
    # The budgets: the layer's top H * n_kept of the safeguarded raw scores, counted per head.
    flat = scores.reshape(-1)
    ranked = flat.sort(descending=True).values
    assert gap_ok(ranked[H * n_kept - 1], ranked[H * n_kept]), "near-tie at the budget cut: another seed"
    budgets = torch.zeros(H, dtype=torch.long).scatter_add_(
        0, flat.topk(H * n_kept).indices // L, torch.ones(H * n_kept, dtype=torch.long))
    # Stage one: each head's top int(b_h * first_stage_ratio), marked.
    first = (budgets * first_stage_ratio).long()
    order = scores.topk(int(first.max()), dim=-1).indices
    for h in range(H):
        scores[h].scatter_(-1, order[h, : first[h]], big)
    # Stage two: (score + epsilon) * ||v W_o^h||_1, each head's top b_h marked.
    wo = w.transpose(0, 1).reshape(H, hs, w.size(0))
    norm = torch.stack([torch.norm(values[h] @ wo[h], p=1, dim=-1) for h in range(H)])
    scores = (scores + epsilon) * norm
    for h in range(H):
        ranked = scores[h].sort(descending=True).values
        if budgets[h] < L:
            assert gap_ok(ranked[budgets[h] - 1], ranked[budgets[h]]), "near-tie at a head's cut: another seed"
        scores[h].scatter_(-1, scores[h].topk(int(budgets[h])).indices, big)
    # The layer keeps its H * n_kept highest: exactly the marked entries.
    kept = torch.zeros(H * L, dtype=torch.bool)
    kept[scores.reshape(-1).topk(H * n_kept).indices] = True
    return kept.reshape(H, L), budgets


def kept_mask(cache, layer, L):
    """A head-wise cache's kept positions of a layer as a mask (B, nh, L)."""
    positions = cache.positions(layer)  # (B, nh, n_max), -1 where a head holds fewer
    mask = torch.zeros(*positions.shape[:2], L + 1, dtype=torch.bool)
    return mask.scatter_(-1, positions.clamp(min=-1) % (L + 1), True)[..., :L] if positions.numel() else mask[..., :L]


def uneven_case(seed, B=2, H=4, L=120, D=16):
    """Heads of different sharpness, so that the budgets differ between heads."""
    q, k, v, weight = random_case(seed, B, H, L, D)
    return q * torch.linspace(0.3, 3, H)[:, None, None], k, v, weight


@pytest.mark.parametrize("scorer", ["snapkv", "tova", "knorm"])
@pytest.mark.parametrize("alpha,ratio", [(0.2, 0.5), (0.0, 0.5), (0.5, 0.3), (1.0, 0.5), (0.2, 0.0), (0.2, 1.0)])
def test_criticaladakv_matches_kvpress_transcription(scorer, alpha, ratio):
    C = 48
    q, k, v, weight = uneven_case(seed=13)
    policy = CriticalAdaKV(max_capacity_prompt=C, scorer=scorer, alpha_safeguard=alpha, first_stage_ratio=ratio)
    cache = compress_one(policy, q, k, v, weight)
    ours = kept_mask(cache, 0, k.size(2))
    scores = on_kvpress_scale(policy.inner, policy.inner.score(0, k, v, q))
    for b in range(k.size(0)):
        expected, budgets = kvpress_criticaladakv_kept(scores[b], v[b], weight, C, alpha, ratio, policy.epsilon)
        assert torch.equal(cache.lengths(0)[b], budgets)  # the per-head budgets
        assert torch.equal(ours[b], expected)


def test_criticaladakv_budgets_come_from_the_raw_scores():
    """The head counts are AdaKV's allocation on the scorer's scores, whatever the values: scaling one head's
    values changes which entries it keeps, not how many. AdaKV over CriticalKV instead counts the +inf
    stage-one entries, a floor of first_stage_ratio * C per head."""
    C, alpha = 96, 0.2
    q, k, v, weight = uneven_case(seed=12, L=300)
    policy = CriticalAdaKV(max_capacity_prompt=C, alpha_safeguard=alpha)
    raw = policy.inner.score(0, k, v, q)
    counts = compress_one(policy, q, k, v, weight).lengths(0)
    assert torch.equal(counts, adaptive_selection(raw, C, alpha).sum(dim=-1))
    assert (counts < int(C * policy.first_stage_ratio)).any()  # a head below the composition's floor
    v2 = v.clone()
    v2[:, 0] *= torch.rand(v.shape[2], 1, generator=torch.Generator().manual_seed(0)) * 10
    assert torch.equal(compress_one(policy, q, k, v2, weight).lengths(0), counts)
    composed = compress_one(AdaKV(max_capacity_prompt=C, scorer="criticalkv", alpha_safeguard=alpha), q, k, v, weight)
    assert (composed.lengths(0) >= int(C * 0.5)).all() and not torch.equal(composed.lengths(0), counts)


@torch.no_grad()
def test_criticaladakv_end_to_end_matches_transcription(model):
    L, C = 90, 40
    ids = random_ids(model, 1, L, 9)
    rec = Prefill.record(model, ids)
    policy = CriticalAdaKV(max_capacity_prompt=C)
    cache = model.new_cache(1, compressor=policy)
    model(ids, cache=cache)
    for i, block in enumerate(model.layers):
        k, v, q = rec.keys[i], rec.values[i], rec.queries[i]
        scores = on_kvpress_scale(policy.inner, policy.inner.score(i, k, v, q))
        expected, budgets = kvpress_criticaladakv_kept(scores[0], v[0], block.attention.dense.weight, C,
                                                       policy.alpha_safeguard, policy.first_stage_ratio,
                                                       policy.epsilon)
        assert torch.equal(cache.lengths(i)[0], budgets)
        assert torch.equal(kept_mask(cache, i, L)[0], expected)
    assert torch.isfinite(model(random_ids(model, 1, 1, 9), cache=cache)).all()


def test_criticaladakv_registered_and_refuses_criticalkv():
    policy = build_compressor("criticaladakv")
    assert type(policy) is CriticalAdaKV and policy.headwise
    assert (policy.max_capacity_prompt, policy.scorer, policy.alpha_safeguard, policy.first_stage_ratio,
            policy.epsilon) == (512, "snapkv", 0.2, 0.5, 1e-4)
    assert policy.label == "criticaladakv_c512_snapkv_a0.2_fs0.5_eps0.0001"
    for settings in (dict(scorer="criticalkv"), dict(scorer="adakv"), dict(first_stage_ratio=2.0),
                     dict(epsilon=-1.0), dict(alpha_safeguard=1.5)):
        with pytest.raises(ValueError):
            CriticalAdaKV(**settings)
