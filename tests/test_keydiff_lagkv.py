"""KeyDiff and LagKV against test-side transcriptions of NVIDIA kvpress, their defining rules by hand, then end to
end through the model.

The transcriptions below are written from a reading of kvpress (`kvpress/presses/keydiff_press.py`,
`kvpress/presses/lagkv_press.py`, and the top-k of `kvpress/presses/scorer_press.py` ScorerPress.compress).
KeyDiff's reference runs in float64, and kept sets are compared after checking that no near-tie sits at the
cut. LagKV's runs in the inputs' dtype, as kvpress does, so its ranks are those of our float32 scores bit for
bit; its own ties (all of its always-kept entries score 1, equal ranks of different partitions score the same)
are handled by checking what top-k must keep, what it must not, and our tie rule for the rest.
"""

import argparse
import math

import pytest
import torch
import torch.nn.functional as F
from minipythia import COMPRESSORS, KVCache, Pythia, PythiaConfig, build_compressor, generate
from minipythia.compressors.keydiff import KeyDiff
from minipythia.compressors.lagkv import LagKV
from minipythia.compressors.registry import decoding_policies

pytestmark = pytest.mark.usefixtures("single_thread")


def random_kv(B=2, H=3, L=60, D=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(B, H, L, D, generator=g) * 1.5, torch.randn(B, H, L, D, generator=g)


def compress_one_layer(compressor, k, v):
    """A one-layer cache holding k, v, compressed as at the end of a prefill (neither policy reads queries)."""
    B, H, L, D = k.shape
    config = PythiaConfig(vocab_size=8, hidden_size=H * D, num_hidden_layers=1, num_attention_heads=H,
                          intermediate_size=8)
    cache = KVCache(config, B, compressor=compressor)
    cache.append(0, k, v)
    cache.compress(0, torch.zeros(B, H, L, D))
    return cache


def top_positions(scores, n, gap=1e-5):
    """The n best positions of scores (..., L), in position order, after checking no near-tie at the cut."""
    ranked = scores.sort(dim=-1, descending=True)
    if 0 < n < scores.size(-1):
        assert (ranked.values[..., n - 1] - ranked.values[..., n] > gap).all(), "near-tie at the cut: pick another seed"
    return ranked.indices[..., :n].sort(dim=-1).values


def check_gathered(cache, layer, k, v):
    idx = cache.positions(layer).unsqueeze(-1).expand(-1, -1, -1, k.size(-1))
    assert torch.equal(cache.keys(layer), k.gather(2, idx)) and torch.equal(cache.values(layer), v.gather(2, idx))


# --- KeyDiff ----------------------------------------------------------------------------------------------

def kvpress_keydiff_scores(keys):
    """kvpress `kvpress/presses/keydiff_press.py`, KeyDiffPress.score, transcribed (float64): the anchor is the
    mean of the L2-normalised keys over the sequence; the score is minus each key's cosine similarity to it.
    ScorerPress.compress then keeps the top int(L * (1 - compression_ratio)); we compare with a capacity."""
    keys = keys.double()
    anchor = F.normalize(keys, p=2, dim=-1).mean(dim=2, keepdim=True)
    return -F.cosine_similarity(keys, anchor, dim=-1)


# (L, C, D): longer than the capacity, one longer, equal, shorter, one kept, head sizes 16 and 64.
KEYDIFF_SHAPES = [(64, 24, 16), (33, 32, 16), (32, 32, 16), (20, 32, 16), (50, 1, 16), (80, 40, 64), (100, 7, 64)]


@pytest.mark.parametrize("L,C,D", KEYDIFF_SHAPES)
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_keydiff_matches_kvpress_on_random_tensors(L, C, D, seed):
    k, v = random_kv(L=L, D=D, seed=seed)
    policy = KeyDiff(max_capacity_prompt=C)
    ref = kvpress_keydiff_scores(k)
    assert (policy.score(0, k, v, None).double() - ref).abs().max() < 1e-6
    cache = compress_one_layer(policy, k, v)
    assert torch.equal(cache.positions(0), top_positions(ref, min(L, C)))
    check_gathered(cache, 0, k, v)
    if L > C > 1:
        assert len({tuple(p) for p in cache.positions(0).reshape(-1, C).tolist()}) > 1, "selection is per head"


def mean_direction_keys(D=16, n_pairs=10, seed=0):
    """Keys whose normalised mean points along e0 exactly: pairs e0 + w, e0 - w with w orthogonal to e0 (equal
    norms, so their unit vectors average onto e0), then 3 e0 (the mean direction itself) and -e0 (its
    opposite; the two cancel in the mean). Returns keys (1, 1, 2 n_pairs + 2, D)."""
    g = torch.Generator().manual_seed(seed)
    e0 = torch.zeros(D)
    e0[0] = 1.0
    w = torch.randn(n_pairs, D, generator=g) * 2
    w[:, 0] = 0
    keys = torch.cat((e0 + w, e0 - w, 3 * e0[None], -e0[None]))
    return keys[None, None]


def test_keydiff_evicts_the_mean_direction_first_and_keeps_its_opposite_first():
    k = mean_direction_keys()
    L = k.size(2)
    along, opposite = L - 2, L - 1
    scores = KeyDiff(max_capacity_prompt=4).score(0, k, k, None)[0, 0]
    assert scores[along] == scores.min() and (scores[along] - (-1.0)).abs() < 1e-6  # cosine 1 with the anchor
    assert scores[opposite] == scores.max() and (scores[opposite] - 1.0).abs() < 1e-6
    assert compress_one_layer(KeyDiff(max_capacity_prompt=L - 1), k, k).positions(0)[0, 0].tolist() == \
        [p for p in range(L) if p != along]
    assert compress_one_layer(KeyDiff(max_capacity_prompt=1), k, k).positions(0)[0, 0].tolist() == [opposite]


def test_keydiff_ignores_key_norms_values_and_queries():
    """A cosine: scaling keys (each by its own factor) changes nothing, unlike KnormPress; values and
    queries are not read."""
    k, v = random_kv(L=40, seed=3)
    scale = torch.rand(2, 3, 40, 1, generator=torch.Generator().manual_seed(4)) * 10 + 0.1
    policy = KeyDiff(max_capacity_prompt=12)
    kept = compress_one_layer(policy, k, v).positions(0)
    assert torch.equal(compress_one_layer(policy, k * scale, v * 7).positions(0), kept)
    assert (policy.score(0, k, v, None) - policy.score(0, k * scale, torch.zeros_like(v), None)).abs().max() < 1e-5


# --- LagKV ------------------------------------------------------------------------------------------------

def kvpress_lagkv_scores(keys, values, n_sink, lag_size):
    """kvpress `kvpress/presses/lagkv_press.py`, LagKVPress.score with cross_scoring=False, transcribed, in the
    inputs' dtype as kvpress computes it. Returns the scores and, for the scored partitions, the raw
    lag-relative score (B, H, P - 1, lag) that the ranks come from (None on the short-prompt branch)."""
    bsz, heads, q_len, d = keys.shape
    if q_len < n_sink + 2 * lag_size:
        # Fewer than two partitions after the sinks: ones for the sinks, then an increasing ramp below 1.
        score = torch.ones(bsz, heads, q_len, dtype=keys.dtype)
        if q_len > n_sink:
            score[:, :, n_sink:] = (torch.arange(q_len - n_sink) / (q_len - n_sink)).to(keys.dtype)
        return score, None
    end_idx = n_sink + ((q_len - n_sink) // lag_size) * lag_size
    tail_len = lag_size + q_len - end_idx  # the last whole partition and what follows it

    def states_score(x):  # x (B, H, P, lag, d): partitions 0 .. P-2 against their successors 1 .. P-1
        ref, cur = x[:, :, 1:], x[:, :, :-1]
        min_r = ref.min(dim=-2).values.unsqueeze(-2).expand(-1, -1, -1, lag_size, -1)
        max_r = ref.max(dim=-2).values.unsqueeze(-2).expand(-1, -1, -1, lag_size, -1)
        return ((cur - min_r) / (max_r - min_r)).std(dim=-1).softmax(dim=-1)

    key_score = states_score(keys[:, :, n_sink:end_idx].view(bsz, heads, -1, lag_size, d))
    value_score = states_score(values[:, :, n_sink:end_idx].view(bsz, heads, -1, lag_size, d))
    raw = (key_score + value_score) / 2
    ranked = (raw.argsort(dim=-1).argsort(dim=-1) / lag_size).to(keys.dtype)  # rank within its partition
    sink = torch.ones(bsz, heads, n_sink, dtype=keys.dtype)
    tail = torch.ones(bsz, heads, tail_len, dtype=keys.dtype)
    return torch.cat((sink, ranked.reshape(bsz, heads, -1), tail), dim=-1), raw


def assert_lagkv_selection(positions, ref_scores, C):
    """Our kept positions (B, H, C) against kvpress's top-C of ref_scores. Where that top-C is determined (no
    tie at the cut), the sets are equal. Otherwise every entry scored above the cut is kept and none below,
    and of those tied at the cut (one rank, several partitions) ours are the latest. Returns the number of
    (batch, head) pairs that needed the tie rule."""
    assert (positions.diff(dim=-1) > 0).all(), "kept entries must come in position order"
    B, H, L = ref_scores.shape
    n_tied = 0
    for b in range(B):
        for h in range(H):
            ours = set(positions[b, h].tolist())
            s = ref_scores[b, h]
            cut = s.sort(descending=True).values[C - 1]
            above, at = (s > cut).nonzero().flatten().tolist(), (s == cut).nonzero().flatten().tolist()
            assert len(ours) == C and set(above) <= ours and ours <= set(above) | set(at), (b, h)
            if len(above) + len(at) == C:
                assert ours == set(s.topk(C).indices.tolist()), (b, h)
            else:
                n_tied += 1
                assert cut < 1, "the always-kept entries fit the budget"
                assert sorted(ours - set(above)) == at[len(above) + len(at) - C :], (b, h)  # latest partitions first
    return n_tied


# (L, n_sink, lag, C): budgets left after the sinks and tail that divide evenly over the scored partitions and
# budgets that do not, no sinks, the smallest lag, the smallest capacity, leftovers after the last partition.
LAGKV_SHAPES = [(60, 2, 8, 24), (60, 2, 8, 25), (100, 4, 8, 40), (100, 4, 8, 45), (40, 0, 8, 20), (30, 4, 8, 19),
                (21, 1, 2, 6), (21, 1, 2, 12), (203, 3, 16, 60), (203, 3, 16, 34)]


@pytest.mark.parametrize("L,n_sink,lag,C", LAGKV_SHAPES)
@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("D", [16, 64])
def test_lagkv_matches_kvpress_on_random_tensors(L, n_sink, lag, C, seed, D):
    k, v = random_kv(L=L, D=D, seed=seed)
    policy = LagKV(max_capacity_prompt=C, n_sink=n_sink, lag_size=lag)
    ref, _ = kvpress_lagkv_scores(k, v, n_sink, lag)
    ours = policy.score(0, k, v, None)
    # Our scores order the entries as kvpress's do, only breaking its ties: ref_i > ref_j => ours_i > ours_j.
    assert not ((ref[..., :, None] > ref[..., None, :]) & ~(ours[..., :, None] > ours[..., None, :])).any()
    cache = compress_one_layer(policy, k, v)
    n_tied = assert_lagkv_selection(cache.positions(0), ref, C)
    P = (L - n_sink) // lag
    tail = lag + (L - n_sink) % lag
    divides = (C - n_sink - tail) % (P - 1) == 0
    assert n_tied == (0 if divides else 6)
    check_gathered(cache, 0, k, v)


@pytest.mark.parametrize("L", [0, 1, 3, 4, 5, 10, 19])
def test_lagkv_short_prompts_score_as_kvpress_and_stay_whole(L):
    """Below n_sink + 2 lag_size kvpress ranks the sinks first, then the newest; with the capacity rule such
    a prompt always fits, so the cache keeps it whole."""
    k, v = random_kv(L=L, seed=L)
    policy = LagKV(max_capacity_prompt=19, n_sink=4, lag_size=8)
    ref, raw = kvpress_lagkv_scores(k, v, 4, 8)
    assert raw is None
    ours = policy.score(0, k, v, None)
    assert not ((ref[..., :, None] > ref[..., None, :]) & ~(ours[..., :, None] > ours[..., None, :])).any()
    assert (ours[..., :4] == float("inf")).all() and (ours[..., 4:].diff(dim=-1) > 0).all()
    if L:
        assert torch.equal(compress_one_layer(policy, k, v).positions(0), torch.arange(L).expand(2, 3, L))


@pytest.mark.parametrize("L", [19, 20, 27, 28, 35, 36, 60, 99])
def test_lagkv_always_keeps_the_sinks_and_the_tail(L):
    """Whatever the sinks and the last partition hold, they are kept; the tail is the last whole partition
    and the L - n_sink mod lag_size entries after it."""
    n_sink, lag = 4, 8
    C = n_sink + 2 * lag - 1  # the smallest capacity allowed
    k, v = random_kv(L=L, seed=L)
    k[:, :, :n_sink] = 0  # sinks and tail made as dull as can be: constant keys and values
    v[:, :, -lag:] = 0.5
    positions = compress_one_layer(LagKV(max_capacity_prompt=C, n_sink=n_sink, lag_size=lag), k, v).positions(0)
    tail = lag + (L - n_sink) % lag if L >= n_sink + 2 * lag else L - n_sink
    always = set(range(n_sink)) | set(range(L - tail, L))
    for p in positions.reshape(-1, positions.size(-1)).tolist():
        assert always <= set(p) and len(p) == min(L, C)


def lag_relative_by_hand(x, n_sink, lag):
    """The lag-relative score of each scored entry, entry by entry in float64: the entry min-max normalised
    per channel over the next partition (0 in a channel constant over it), its std over channels
    (Bessel-corrected, as torch.std), softmaxed over its partition. x (L, D) -> (P - 1, lag)."""
    x = x.double()
    P = (x.size(0) - n_sink) // lag
    part = [x[n_sink + i * lag : n_sink + (i + 1) * lag] for i in range(P)]
    out = torch.empty(P - 1, lag, dtype=torch.float64)
    for i in range(P - 1):
        low, high = part[i + 1].min(dim=0).values, part[i + 1].max(dim=0).values
        span = high - low
        for t in range(lag):
            z = torch.where(span > 0, (part[i][t] - low) / span, 0.0)  # a constant channel contributes 0
            out[i, t] = math.sqrt(((z - z.mean()) ** 2).sum() / (z.numel() - 1))
        out[i] = out[i].exp() / out[i].exp().sum()
    return out


def test_lagkv_spreads_the_budget_evenly_over_partitions_by_their_own_scores():
    """With a budget that divides, each scored partition keeps exactly its own best r entries (the paper's
    per-partition top-k), whatever the scores of the other partitions."""
    L, n_sink, lag = 100, 4, 8  # 12 partitions: 11 scored, the 12th is the tail
    r = 3
    C = n_sink + lag + 11 * r
    k, v = random_kv(B=1, H=2, L=L, seed=7)
    k[:, :, n_sink + 3 * lag : n_sink + 4 * lag] *= 50  # one partition of huge keys: it still keeps just r
    positions = compress_one_layer(LagKV(max_capacity_prompt=C, n_sink=n_sink, lag_size=lag), k, v).positions(0)
    for h in range(2):
        score = (lag_relative_by_hand(k[0, h], n_sink, lag) + lag_relative_by_hand(v[0, h], n_sink, lag)) / 2
        kept = set(positions[0, h].tolist())
        for i in range(11):
            start = n_sink + i * lag
            assert {p - start for p in kept if start <= p < start + lag} == \
                set(top_positions(score[i], r, gap=1e-6).tolist()), (h, i)


def test_lagkv_keeps_what_stands_out_against_the_next_partition():
    """An entry whose channels sit at the extremes of the next partition's range has the largest spread;
    entries in the middle of that range everywhere have almost none. 8 partitions of 8, no sinks, a budget of
    one entry per scored partition (the smallest capacity allowed, 15): partition 0 keeps its standout."""
    D, lag = 16, 8
    g = torch.Generator().manual_seed(0)
    x = torch.rand(1, 1, lag * lag, D, generator=g)
    low, high = x[0, 0, lag : 2 * lag].min(dim=0).values, x[0, 0, lag : 2 * lag].max(dim=0).values
    x[0, 0, :lag] = (low + high) / 2 + 0.01 * torch.randn(lag, D, generator=g)
    x[0, 0, 5] = torch.where(torch.arange(D) % 2 == 0, low, high)  # alternating extremes: spread ~ 0.5
    policy = LagKV(max_capacity_prompt=2 * lag - 1, n_sink=0, lag_size=lag)
    kept = compress_one_layer(policy, x, x).positions(0)[0, 0].tolist()
    assert [p for p in kept if p < lag] == [5]
    assert [p // lag for p in kept[:-lag]] == list(range(lag - 1))  # one from each scored partition
    assert kept[-lag:] == list(range(lag * lag - lag, lag * lag))  # and the tail


def test_lagkv_constant_values_leave_the_ranking_to_the_keys():
    """Repeated tokens can make a channel constant over a partition (0 / 0 in the normalisation, NaN in
    kvpress). Such a channel contributes 0: with every value the same, every entry's value spread is 0, the
    value score uniform, and each partition keeps its best entries by the key score alone."""
    L, n_sink, lag = 44, 4, 8
    k = torch.randn(1, 2, L, 16, generator=torch.Generator().manual_seed(1))
    v = torch.ones(1, 2, L, 16)
    policy = LagKV(max_capacity_prompt=n_sink + lag + 2 * 4, n_sink=n_sink, lag_size=lag)  # 2 per partition
    assert torch.isfinite(policy.score(0, k, v, None)[..., n_sink : L - lag]).all()
    positions = compress_one_layer(policy, k, v).positions(0)
    for h in range(2):
        by_keys = lag_relative_by_hand(k[0, h], n_sink, lag)  # (4, lag)
        best = [n_sink + i * lag + t for i in range(4) for t in top_positions(by_keys[i], 2, gap=1e-6).tolist()]
        assert positions[0, h].tolist() == list(range(n_sink)) + sorted(best) + list(range(L - lag, L))


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_lagkv_constant_channels_contribute_zero(seed):
    """Dead key channels (zero over the whole prompt, as tiny-pg19 has) and a channel constant over one
    partition only: the scores are those computed by hand with such a channel at 0, never NaN."""
    L, n_sink, lag, D = 60, 4, 8, 16
    k, v = random_kv(B=1, H=2, L=L, D=D, seed=seed)
    k[:, 0, :, 3] = 0.0  # a dead channel in head 0
    k[:, 1, n_sink + 2 * lag : n_sink + 3 * lag, 5] = 0.7  # constant over partition 2 (the reference of 1)
    v[:, 1, :, :4] = -1.0
    policy = LagKV(max_capacity_prompt=n_sink + lag + 6 * 3, n_sink=n_sink, lag_size=lag)
    scores = policy.score(0, k, v, None)
    assert not scores.isnan().any()
    positions = compress_one_layer(policy, k, v).positions(0)
    for h in range(2):
        score = (lag_relative_by_hand(k[0, h], n_sink, lag) + lag_relative_by_hand(v[0, h], n_sink, lag)) / 2
        kept = set(positions[0, h].tolist())
        for i in range(score.size(0)):
            start = n_sink + i * lag
            assert {p - start for p in kept if start <= p < start + lag} == \
                set(top_positions(score[i], 3, gap=1e-6).tolist()), (h, i)


# --- end to end --------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def model(reference_checkpoint):
    return Pythia.from_pretrained(reference_checkpoint("tiny", 0.25, True)[1]).for_inference()  # 2 layers, 4 heads


def token_ids(model, B, T, seed):
    return torch.randint(0, model.config.vocab_size, (B, T), generator=torch.Generator().manual_seed(seed))


def decode_and_check(model, cache, logits, L, keep, steps=4):
    for _ in range(steps):
        logits = model(logits[:, -1:].argmax(-1), cache=cache)
        assert torch.isfinite(logits).all()
    assert cache.seen == L + steps
    for i in range(model.config.num_hidden_layers):
        assert cache.length(i) == keep + steps
        new = cache.positions(i)[..., -steps:]  # the decoded tokens, at their own positions, in every head
        assert torch.equal(new, torch.arange(L, L + steps).expand_as(new))


@torch.no_grad()
def test_keydiff_end_to_end_then_decoding(model):
    B, L, C = 2, 48, 20
    ids = token_ids(model, B, L, 0)
    full = model.new_cache(B)
    model(ids, cache=full)
    policy = KeyDiff(max_capacity_prompt=C)
    cache = model.new_cache(B, policy)
    logits = model(ids, cache=cache)
    for i in range(model.config.num_hidden_layers):
        positions = cache.positions(i)
        assert positions.shape == (B, model.config.num_attention_heads, C)
        assert torch.equal(positions, top_positions(kvpress_keydiff_scores(full.keys(i)), C))
        check_gathered(cache, i, full.keys(i), full.values(i))
        assert len({tuple(p) for p in positions.reshape(-1, C).tolist()}) > 1, "selection is per head"
    decode_and_check(model, cache, logits, L, C)
    out = generate(model, ids[0].tolist(), max_new_tokens=3, compressor=policy)
    assert len(out.tokens) == 3 and out.kept_after_prefill == C


@torch.no_grad()
def test_keydiff_compresses_during_decoding_by_the_anchor_of_what_the_cache_holds(model):
    """With decode_interval N, each trigger keeps the C entries (of the C + N + 1 held) least like their own
    mean key: the paper's block-wise eviction. Checked in layer 0, whose keys depend only on the tokens and
    positions, so those of an uncompressed run of the same tokens are the ones the cache holds."""
    L, C, N, steps = 30, 16, 3, 14
    ids = token_ids(model, 1, L + steps, 1)
    full = model.new_cache(1)
    model(ids, cache=full)
    cache = model.new_cache(1, KeyDiff(max_capacity_prompt=C), decode_interval=N)
    model(ids[:, :L], cache=cache)
    triggers = 0
    for t in range(L, L + steps):
        held = torch.cat((cache.positions(0), torch.full((1, 4, 1), t)), dim=-1)  # (1, nh, n + 1)
        model(ids[:, t : t + 1], cache=cache)
        assert cache.length(0) <= C + N
        if cache.length(0) == C and held.size(-1) > C:
            triggers += 1
            keys = full.keys(0).gather(2, held.unsqueeze(-1).expand(-1, -1, -1, model.config.head_size))
            expected = held.gather(-1, top_positions(kvpress_keydiff_scores(keys), C))
            assert torch.equal(cache.positions(0), expected)
    assert triggers == steps // (N + 1)


@torch.no_grad()
def test_lagkv_end_to_end_matches_kvpress_then_decoding(model):
    B, L, n_sink, lag, C = 2, 60, 2, 8, 24  # 7 partitions: 6 scored keep 2 each, the 7th and 2 leftovers kept
    ids = token_ids(model, B, L, 2)
    full = model.new_cache(B)
    model(ids, cache=full)
    policy = LagKV(max_capacity_prompt=C, n_sink=n_sink, lag_size=lag)
    cache = model.new_cache(B, policy)
    logits = model(ids, cache=cache)
    for i in range(model.config.num_hidden_layers):
        ref, _ = kvpress_lagkv_scores(full.keys(i), full.values(i), n_sink, lag)
        assert assert_lagkv_selection(cache.positions(i), ref, C) == 0
        check_gathered(cache, i, full.keys(i), full.values(i))
        assert len({tuple(p) for p in cache.positions(i).reshape(-1, C).tolist()}) > 1, "selection is per head"
    decode_and_check(model, cache, logits, L, C)
    out = generate(model, ids[0].tolist(), max_new_tokens=3, compressor=policy)
    assert len(out.tokens) == 3 and out.kept_after_prefill == C


def test_lagkv_refuses_to_compress_during_decoding(model):
    with pytest.raises(ValueError, match="lagkv cannot compress during decoding: it ranks runs of lag_size"):
        model.new_cache(1, LagKV(), decode_interval=4)
    assert "keydiff" in decoding_policies() and "lagkv" not in decoding_policies()


# --- settings, registry, labels, command line ---------------------------------------------------------------

@pytest.mark.parametrize("make,message", [
    (lambda: KeyDiff(max_capacity_prompt=0), "max_capacity_prompt must be >= 1"),
    (lambda: LagKV(max_capacity_prompt=0), "max_capacity_prompt must be >= 1"),
    (lambda: LagKV(n_sink=-1), "n_sink must be >= 0"),
    (lambda: LagKV(lag_size=1), "lag_size must be >= 2"),
    (lambda: LagKV(lag_size=0), "lag_size must be >= 2"),
    (lambda: LagKV(max_capacity_prompt=130, n_sink=4, lag_size=64),
     r"max_capacity_prompt \(130\) must be >= n_sink \+ 2 \* lag_size - 1 = 131"),
    (lambda: LagKV(max_capacity_prompt=64), "= 259"),  # the default lag_size 128 needs a larger capacity
    (lambda: build_compressor("lagkv", {"max_capacity_prompt": 16, "lag_size": 8, "n_sink": 2}), "= 17"),
])
def test_invalid_settings_say_what_is_allowed(make, message):
    with pytest.raises(ValueError, match=message):
        make()


def test_registry_and_labels():
    assert COMPRESSORS["keydiff"] is KeyDiff and COMPRESSORS["lagkv"] is LagKV
    assert KeyDiff().label == "keydiff_c512" and KeyDiff(64).label == "keydiff_c64"
    assert LagKV().label == "lagkv_c512_sink4_lag128"
    assert LagKV().settings() == {"max_capacity_prompt": 512, "n_sink": 4, "lag_size": 128}
    assert build_compressor("lagkv", {"lag_size": 16, "n_sink": 0}).label == "lagkv_c512_sink0_lag16"
    assert LagKV(max_capacity_prompt=259).max_capacity_prompt == 259  # the smallest the defaults allow
    assert KeyDiff().decode_queries() == 0


@pytest.mark.parametrize("options,expected", [
    ("--compressor keydiff --max-capacity-prompt 64", KeyDiff(max_capacity_prompt=64)),
    ("--compressor lagkv --max-capacity-prompt 64 --n-sink 2 --lag-size 16",
     LagKV(max_capacity_prompt=64, n_sink=2, lag_size=16)),
])
def test_cli_options_build_each_policy(options, expected):
    from minipythia.cli import add_compressor_args, compressor_from_args

    parser = argparse.ArgumentParser()
    add_compressor_args(parser, options.split())
    assert compressor_from_args(parser.parse_args(options.split())) == expected
