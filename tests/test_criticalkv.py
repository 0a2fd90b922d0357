"""CriticalKV: against a transcription of kvpress's selection, by hand, end to end, and its settings.

The transcription works in float64 with kvpress's own marker for the first stage (the dtype's largest
finite value); every comparison of kept sets first checks that no near-tie sits at either stage's cut.
"""

from types import SimpleNamespace

import pytest
import torch
from conftest import random_ids
from minipythia import COMPRESSORS, KVCache, Prefill, Pythia, PythiaConfig, SnapKV, build_compressor
from minipythia.compressors.criticalkv import CriticalKV

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


def fake_model(weights):
    """What prepare() reads of a model: layers[i].attention.dense.weight."""
    return SimpleNamespace(layers=[SimpleNamespace(attention=SimpleNamespace(dense=SimpleNamespace(weight=w)))
                                   for w in weights])


def compress_one(compressor, q, k, v, weight):
    B, H, _, D = k.shape
    config = PythiaConfig(vocab_size=8, hidden_size=H * D, num_hidden_layers=1, num_attention_heads=H,
                          intermediate_size=8)
    compressor.prepare(fake_model([weight]), torch.zeros(B, k.size(2), dtype=torch.long))
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
    expected = kvpress_criticalkv_kept(alone.score(0, k, v, q), v, weight, C, ratio, ckv.epsilon)
    assert torch.equal(cache.positions(0), expected)
    assert cache.length(0) == C


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
    ckv.prepare(fake_model([dense.weight]), torch.zeros(B, L, dtype=torch.long))
    got = ckv.projected_norm(0, v)
    for h in range(H):
        y = torch.zeros(B, L, H * D)
        y[..., h * D:(h + 1) * D] = v[:, h]
        expected = (dense(y) - dense.bias).abs().sum(dim=-1)
        assert torch.allclose(got[:, h], expected, atol=1e-5)


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
        expected = kvpress_criticalkv_kept(snap.score(i, k, v, q), v, block.attention.dense.weight, C,
                                           ckv.first_stage_ratio, ckv.epsilon)
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


def test_criticaladakv_is_adakv_over_criticalkv():
    from minipythia import build_compressor
    from minipythia.compressors.adakv import AdaKV
    from minipythia.weights import EMBEDDED_MODEL

    model = Pythia.from_pretrained(EMBEDDED_MODEL).for_inference()
    ids = torch.randint(0, 8000, (1, 600), generator=torch.Generator().manual_seed(0))
    named, composed = (model.new_cache(compressor=c) for c in (build_compressor("criticaladakv", {
        "max_capacity_prompt": 128}), AdaKV(max_capacity_prompt=128, scorer="criticalkv")))
    model(ids, cache=named), model(ids, cache=composed)
    for layer in range(named.num_layers):
        assert torch.equal(named.positions(layer), composed.positions(layer))
        assert torch.equal(named.lengths(layer), composed.lengths(layer))
