"""ExpectedAttention and ChunkKV against test-side transcriptions of NVIDIA kvpress, their defining rules by
hand, then end to end through the model.

The transcriptions below are written from a reading of kvpress (`kvpress/presses/expected_attention_press.py`
and `kvpress/presses/chunkkv_press.py`), step for step, in float64. Kept sets are compared exactly wherever
the reference's scores leave no near-tie at the cut; where they do, the case is counted and skipped.
"""

import math

import pytest
import torch
import torch.nn.functional as F
from conftest import kept_sets_agree, random_ids, rotary_by_hand
from minipythia import COMPRESSORS, TOVA, KVCache, KnormPress, Prefill, Pythia, PythiaConfig, SnapKV, build_compressor
from minipythia.compressors.chunkkv import ChunkKV
from minipythia.compressors.expected_attention import ExpectedAttention

pytestmark = pytest.mark.usefixtures("single_thread")


def one_layer_config(H, D, rotary_pct=0.25):
    return PythiaConfig(vocab_size=8, hidden_size=H * D, num_hidden_layers=1, num_attention_heads=H,
                        intermediate_size=8, rotary_pct=rotary_pct)


def compress_one_layer(compressor, q, k, v, rotary_pct=0.25):
    """A one-layer cache (which calls for_model) holding k, v, compressed with the prefill queries q."""
    B, H, _, D = k.shape
    cache = KVCache(one_layer_config(H, D, rotary_pct), B, compressor=compressor)
    cache.append(0, k, v)
    cache.compress(0, q)
    return cache


# --- ExpectedAttention --------------------------------------------------------------------------------------

def kvpress_expected_attention_scores(prerope_queries, keys, values, n_future_positions, n_sink, use_covariance,
                                      use_vnorm, epsilon, rotary_ndims, rotary_base=10000.0):
    """kvpress `kvpress/presses/expected_attention_press.py`, ExpectedAttentionPress.score with
    get_query_statistics and apply_avg_rope, transcribed (one query head per key head: Pythia has no GQA).

    prerope_queries (B, H, L, d) stand for get_prerope_query_states on the prompt's hidden states. kvpress's
    rotation matrix R = cos * I + sin * P spans the whole head; Pythia rotates only its first rotary_ndims
    features, so R is that matrix on those features and the identity on the others (the same as kvpress's
    with rotary_ndims = d)."""
    B, H, L, d = keys.shape
    # get_query_statistics: the queries after the sinks, their mean and (biased) covariance.
    query_states = prerope_queries[:, :, n_sink:].double()
    mu = query_states.mean(dim=2, keepdim=True)
    cov = None
    if use_covariance:
        centered = query_states - mu
        cov = torch.einsum("bnsi,bnsj->bnij", centered, centered) / (L - n_sink)
    mu = mu.squeeze(2)
    # apply_avg_rope: the rotation matrices of positions L .. L + n_future - 1, averaged.
    nd = rotary_ndims
    inv_freq = 1.0 / rotary_base ** (torch.arange(0, nd, 2, dtype=torch.float32) / nd)
    freqs = torch.outer(torch.arange(L, L + n_future_positions, dtype=torch.float32), inv_freq)
    emb = torch.cat((freqs, freqs), dim=-1)
    cos, sin = emb.cos().double(), emb.sin().double()  # (n_future, nd)
    eye = torch.eye(nd, dtype=torch.float64)
    P = torch.zeros(nd, nd, dtype=torch.float64)
    P[nd // 2 :, : nd // 2], P[: nd // 2, nd // 2 :] = torch.eye(nd // 2), -torch.eye(nd // 2)
    R_rot = (cos.unsqueeze(1) * eye + sin.unsqueeze(1) * P).mean(dim=0)
    R = torch.eye(d, dtype=torch.float64)
    R[:nd, :nd] = R_rot
    mu = mu @ R.T
    if cov is not None:
        cov = R @ cov @ R.T
    # score: the keys after the sinks; expected attention, softmax, value norms; sinks padded with max + 1.
    k = keys[:, :, n_sink:].double().transpose(2, 3)  # (B, H, d, L - n_sink)
    v = values[:, :, n_sink:].double()
    scores = (mu.unsqueeze(2) @ k).squeeze(2) / math.sqrt(d)
    if use_covariance:
        scores = scores + torch.einsum("bhin,bhij,bhjn->bhn", k, cov, k) / d / 2
    scores = F.softmax(scores, dim=-1)
    if use_vnorm:
        scores = (scores + epsilon) * v.norm(dim=-1)
    return F.pad(scores, (n_sink, 0), value=scores.max().item() + 1)


def random_prompt(B, H, L, D, seed, rotary_pct):
    """Pre-rotary queries with a mean of their own (as real queries have), their rotated form at positions
    0 .. L-1 (what the cache is given), and random keys and values."""
    g = torch.Generator().manual_seed(seed)
    q_pre = torch.randn(B, H, L, D, generator=g) + 1.5 * torch.randn(B, H, 1, D, generator=g)
    k, v = torch.randn(B, H, L, D, generator=g), torch.randn(B, H, L, D, generator=g)
    q = rotary_by_hand(q_pre, range(L), one_layer_config(H, D, rotary_pct))
    return q_pre, q, k, v


# (B, H, L, D, C, n_sink, n_future)
EA_SHAPES = [(2, 3, 64, 16, 24, 4, 512), (1, 2, 40, 16, 39, 0, 16), (2, 2, 100, 32, 30, 4, 1), (1, 4, 33, 16, 8, 7, 64)]


@pytest.mark.parametrize("B,H,L,D,C,n_sink,n_future", EA_SHAPES)
@pytest.mark.parametrize("rotary_pct", [1.0, 0.25])
@pytest.mark.parametrize("use_covariance,use_vnorm,epsilon", [(True, True, 0.0), (False, True, 0.01),
                                                               (True, False, 0.0), (False, False, 0.0)])
def test_expected_attention_matches_kvpress_on_random_tensors(B, H, L, D, C, n_sink, n_future, rotary_pct,
                                                              use_covariance, use_vnorm, epsilon):
    q_pre, q, k, v = random_prompt(B, H, L, D, seed=L + C, rotary_pct=rotary_pct)
    ea = ExpectedAttention(max_capacity_prompt=C, n_future_positions=n_future, n_sink=n_sink,
                           use_covariance=use_covariance, use_vnorm=use_vnorm, epsilon=epsilon)
    cache = compress_one_layer(ea, q, k, v, rotary_pct)
    nd = one_layer_config(H, D, rotary_pct).rotary_ndims
    ref = kvpress_expected_attention_scores(q_pre, k, v, n_future, n_sink, use_covariance, use_vnorm, epsilon, nd)

    ours = ea.score(0, k, v, q).double()
    assert torch.isinf(ours[..., :n_sink]).all(), "the sinks are always kept"
    assert torch.allclose(ours[..., n_sink:], ref[..., n_sink:], rtol=1e-4, atol=1e-9)
    positions = cache.positions(0)
    assert positions.shape == (B, H, C) and torch.equal(positions[..., :n_sink], torch.arange(n_sink).expand(B, H, -1))
    compared, tied = kept_sets_agree(positions, ref, C)
    assert compared >= 3 * tied and compared > 0


def test_expected_attention_without_covariance_or_vnorm_by_hand():
    """Queries and keys only on the features rotary leaves alone (rotary_pct 0.5 of a 4-feature head
    rotates features 0 and 1), so the rotation is the identity there: with one sink, the statistics are
    those of queries 1..3, mean (0, 0, 1, 1), and the scores are softmax(mean . k / sqrt(4)) over keys 1..4."""
    q = torch.tensor([[9.0, 0, 5, 5], [0, 0, 2, 0], [0, 0, 0, 2], [0, 0, 1, 1]])[None, None]  # positions 0..3
    k = torch.tensor([[0.0, 0, 9, 9], [0, 0, 2, 0], [0, 0, 0, 0], [0, 0, -2, 0]])[None, None]
    v = torch.ones_like(k)
    ea = ExpectedAttention(max_capacity_prompt=3, n_sink=1, use_covariance=False, use_vnorm=False)
    cache = compress_one_layer(ea, q, k, v, rotary_pct=0.5)
    logits = torch.tensor([1.0, 0.0, -1.0])  # mean . k / 2 for keys 1, 2, 3
    expected = logits.exp() / logits.exp().sum()
    scores = ea.score(0, k, v, q)[0, 0]
    assert scores[0] == float("inf")
    assert torch.allclose(scores[1:], expected, atol=1e-6)
    assert cache.positions(0)[0, 0].tolist() == [0, 1, 2]  # the sink, then the two best keys


def test_expected_attention_rotations_kept_per_prompt_length_change_nothing():
    """The rotations are computed once per prompt length and reused by later layers: scoring prompts of other
    lengths in between, or with another model's rotary, gives a fresh policy's scores bit for bit."""
    g = torch.Generator().manual_seed(11)
    reused = ExpectedAttention(max_capacity_prompt=4, n_future_positions=5, n_sink=2)
    for L, rotary_pct in [(9, 0.25), (12, 0.25), (9, 0.25), (9, 0.5)]:
        q, k, v = (torch.randn(2, 3, L, 8, generator=g) for _ in range(3))
        fresh = ExpectedAttention(max_capacity_prompt=4, n_future_positions=5, n_sink=2)
        for policy in (reused, fresh):
            policy.for_model(one_layer_config(3, 8, rotary_pct))
        assert torch.equal(reused.score(0, k, v, q), fresh.score(0, k, v, q))


def test_expected_attention_of_one_query_is_its_attention_at_the_next_position():
    """Queries that are all one pre-rotary vector x (each rotated at its own position): their mean is x and
    their covariance 0, so with one future position the expected query is x rotated to position L, and the
    scores are the softmax attention that query would give the non-sink keys. With use_vnorm and epsilon
    they become (attention + epsilon) * ||v||."""
    B, H, L, D, n_sink = 1, 2, 12, 16, 2
    config = one_layer_config(H, D, rotary_pct=0.5)
    q_pre, _, k, v = random_prompt(B, H, L, D, seed=3, rotary_pct=0.5)
    x = q_pre[:, :, -1:]
    q = rotary_by_hand(x.expand(B, H, L, D), range(L), config)
    future_q = rotary_by_hand(x, [L], config).double()  # (B, H, 1, D)
    attn = (future_q @ k[:, :, n_sink:].double().transpose(-1, -2) / math.sqrt(D)).softmax(dim=-1)[:, :, 0]
    for use_covariance in (False, True):  # the covariance is 0
        ea = ExpectedAttention(max_capacity_prompt=4, n_future_positions=1, n_sink=n_sink,
                               use_covariance=use_covariance, use_vnorm=False)
        ea.for_model(config)
        assert torch.allclose(ea.score(0, k, v, q)[..., n_sink:].double(), attn, atol=1e-6)
    ea = ExpectedAttention(max_capacity_prompt=4, n_future_positions=1, n_sink=n_sink, use_covariance=False,
                           use_vnorm=True, epsilon=0.5)
    ea.for_model(config)
    got = ea.score(0, k, v, q)[..., n_sink:].double()
    assert torch.allclose(got, (attn + 0.5) * v[:, :, n_sink:].double().norm(dim=-1), atol=1e-5)


# --- ChunkKV ------------------------------------------------------------------------------------------------

def kvpress_chunkkv_keep(global_scores, chunk_length, compression_ratio):
    """kvpress `kvpress/presses/chunkkv_press.py`, ChunkKVPress.compress, transcribed: the indices it keeps,
    sorted (B, H, n). The heads share the chunks, and every sequence gets those of the first one (call it
    on one sequence at a time). With no complete chunk kvpress calls the scorer press's compress: the top
    int(L * (1 - ratio)) scores of each head (ScorerPress.compress). Also returns the chunk scores."""
    B, H, L = global_scores.shape
    n_complete, remaining = L // chunk_length, L % chunk_length
    if n_complete == 0:
        n_kept = int(L * (1 - compression_ratio))
        return global_scores.topk(n_kept, dim=-1).indices.sort(dim=-1).values, None
    main = global_scores[..., : n_complete * chunk_length].sum(dim=1).view(-1, n_complete, chunk_length).mean(dim=-1)
    chunk_scores = main
    if remaining > 0:
        last = global_scores[..., -remaining:].sum(dim=1).mean(dim=-1, keepdim=True)
        chunk_scores = torch.cat([main, last], dim=-1)
    n_chunks_kept = max(1, int((n_complete + (remaining > 0)) * (1 - compression_ratio)))
    top = chunk_scores.topk(n_chunks_kept, dim=-1)
    pieces = []
    for chunk in top.indices[0].tolist():
        if chunk < n_complete:
            pieces.append(torch.arange(chunk * chunk_length, (chunk + 1) * chunk_length))
        else:
            pieces.append(torch.arange(n_complete * chunk_length, L))
    indices = torch.cat(pieces).sort().values
    return indices.expand(B, H, -1), (chunk_scores, n_chunks_kept)


def chunk_cut_is_clear(chunk_scores, n_kept, rel_gap=1e-6):
    ranked = chunk_scores[0].sort(descending=True).values
    if n_kept >= ranked.numel():
        return True
    cut, below = ranked[n_kept - 1], ranked[n_kept]
    return bool(cut - below > rel_gap * below.abs())  # inf > finite; inf - inf is nan: a tie


# (scorer, L, chunk_size, chunks kept): with and without a short last chunk, a few to most chunks.
CHUNK_CASES = [("snapkv", 150, 7, 10), ("snapkv", 150, 10, 6), ("snapkv", 203, 20, 4), ("tova", 64, 5, 4),
               ("tova", 61, 8, 3), ("knorm", 50, 4, 5), ("knorm", 47, 6, 7), ("expected_attention", 90, 9, 5),
               ("h2o", 120, 10, 5)]


@pytest.mark.parametrize("scorer,L,chunk_size,n_chunks", CHUNK_CASES)
@pytest.mark.parametrize("seed", [0, 1])
def test_chunkkv_matches_kvpress_on_random_tensors(scorer, L, chunk_size, n_chunks, seed):
    """kvpress keeps n whole chunks; with C set to the number of entries they hold, we keep the same ones.
    The inner scores come from our scorer on the same tensors (kvpress's ChunkKV wraps whichever scorer)."""
    B, H, D = 2, 3, 16
    _, q, k, v = random_prompt(B, H, L, D, seed, rotary_pct=0.25)
    total_chunks = math.ceil(L / chunk_size)
    ratio = 1 - (n_chunks + 0.5) / total_chunks  # int(total * (1 - ratio)) = n_chunks
    probe = ChunkKV(max_capacity_prompt=n_chunks * chunk_size, chunk_size=chunk_size, scorer=scorer)
    probe.for_model(one_layer_config(H, D))
    inner = probe.inner.score(0, k, v, q)
    compared = 0
    for b in range(B):
        ref, (chunk_scores, kept_chunks) = kvpress_chunkkv_keep(inner[b : b + 1], chunk_size, ratio)
        assert kept_chunks == n_chunks
        if not chunk_cut_is_clear(chunk_scores, n_chunks):
            continue
        # Our budget: what kvpress kept (fewer than n * chunk_size when the short chunk is among them).
        C = ref.size(-1)
        ck = ChunkKV(max_capacity_prompt=C, chunk_size=chunk_size, scorer=scorer)
        # The very scores the reference chunked (H2O's depend on its budget, which C may have changed).
        ck.inner.score = lambda *args, scores=inner[b : b + 1]: scores
        cache = compress_one_layer(ck, q[b : b + 1], k[b : b + 1], v[b : b + 1])
        assert torch.equal(cache.positions(0), ref)
        compared += 1
    assert compared > 0


def test_chunkkv_each_sequence_chooses_its_own_chunks():
    """kvpress gives the whole batch the first sequence's chunks; here each sequence of a batch keeps what
    it would keep alone."""
    B, H, L, D = 3, 2, 60, 16
    _, q, k, v = random_prompt(B, H, L, D, seed=5, rotary_pct=0.25)
    batch = compress_one_layer(ChunkKV(max_capacity_prompt=20, chunk_size=5, scorer="tova"), q, k, v)
    for b in range(B):
        alone = compress_one_layer(ChunkKV(max_capacity_prompt=20, chunk_size=5, scorer="tova"),
                                   q[b : b + 1], k[b : b + 1], v[b : b + 1])
        assert torch.equal(batch.positions(0)[b : b + 1], alone.positions(0))
    assert not torch.equal(batch.positions(0)[0], batch.positions(0)[1])


def test_chunkkv_fills_the_budget_from_the_next_chunk_by_hand():
    """L = 10 in chunks of 3: [0-2], [3-5], [6-8] and the short [9]. Per-entry scores (two heads, summed):
    chunk means 2, 5, 1 and 9. With C = 6: the short chunk (mean 9, one entry) and chunk [3-5] (mean 5) fit
    whole; the 2 remaining entries are the best two of the next chunk, [0-2] (mean 2): entries 2 and 0."""
    per_token = torch.tensor([2.5, 0.5, 3.0, 5.0, 5.0, 5.0, 1.0, 1.0, 1.0, 9.0], dtype=torch.float64)
    scores = torch.stack((per_token * 0.25, per_token * 0.75))[None]  # (1, 2, 10): heads sum to per_token
    ck = ChunkKV(max_capacity_prompt=6, chunk_size=3, scorer="tova")
    ck.inner.score = lambda *args: scores
    q = k = v = torch.zeros(1, 2, 10, 4)
    cache = compress_one_layer(ck, q, k, v)
    assert cache.positions(0).tolist() == [[[0, 2, 3, 4, 5, 9]] * 2]
    # C = 4: the short chunk and chunk [3-5] hold exactly 4, as kvpress keeping 2 of the 4 chunks.
    ck4 = ChunkKV(max_capacity_prompt=4, chunk_size=3, scorer="tova")
    ck4.inner.score = lambda *args: scores
    assert compress_one_layer(ck4, q, k, v).positions(0).tolist() == [[[3, 4, 5, 9]] * 2]
    ref, _ = kvpress_chunkkv_keep(scores, 3, 1 - 2.5 / 4)
    assert ref.tolist() == [[[3, 4, 5, 9]] * 2]


@pytest.mark.parametrize("scorer,L,C,chunk_size", [("snapkv", 120, 45, 8), ("tova", 50, 17, 4), ("h2o", 80, 30, 7),
                                                   ("knorm", 41, 12, 5), ("streaming_llm", 64, 20, 6)])
def test_chunkkv_keeps_whole_contiguous_chunks(scorer, L, C, chunk_size):
    """Every head keeps the same entries: whole chunks, plus part of at most one more chunk."""
    B, H, D = 2, 3, 16
    _, q, k, v = random_prompt(B, H, L, D, seed=C, rotary_pct=0.25)
    positions = compress_one_layer(ChunkKV(C, chunk_size, scorer), q, k, v).positions(0)
    assert positions.shape == (B, H, C)
    assert torch.equal(positions, positions[:, :1].expand_as(positions)), "the heads share the chunks"
    for b in range(B):
        counts = torch.bincount(positions[b, 0] // chunk_size, minlength=math.ceil(L / chunk_size))
        sizes = torch.bincount(torch.arange(L) // chunk_size)
        partial = ((counts > 0) & (counts < sizes)).sum().item()
        assert partial <= 1 and counts.sum() == C


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_chunkkv_with_chunks_of_one_is_its_scorer(seed):
    """Chunks of one entry: TOVA (whose scores the heads share already) is reproduced exactly; a per-head
    scorer such as SnapKV becomes the top C of its scores summed over the heads (kvpress sums the heads)."""
    B, H, L, D, C = 2, 3, 70, 16, 40
    _, q, k, v = random_prompt(B, H, L, D, seed, rotary_pct=0.25)
    tova = compress_one_layer(TOVA(C), q, k, v).positions(0)
    assert torch.equal(compress_one_layer(ChunkKV(C, 1, "tova"), q, k, v).positions(0), tova)
    snap = SnapKV(max_capacity_prompt=C)
    summed = snap.score(0, k, v, q).double().sum(dim=1, keepdim=True).expand(B, H, L)
    positions = compress_one_layer(ChunkKV(C, 1, "snapkv"), q, k, v).positions(0)
    finite = summed.clone()
    finite[torch.isinf(finite)] = 1e9  # the window: kept by both
    compared, tied = kept_sets_agree(positions, finite, C, rel_gap=1e-9)
    assert tied == 0 and compared == B * H


def test_chunkkv_shorter_than_a_chunk_is_its_scorer():
    """No whole chunk (L < chunk_size): the scorer's own per-head selection, as kvpress delegates."""
    B, H, L, D, C = 2, 3, 15, 16, 10
    _, q, k, v = random_prompt(B, H, L, D, seed=4, rotary_pct=0.25)
    ours = compress_one_layer(ChunkKV(C, 20, "knorm"), q, k, v).positions(0)
    lowest_norm = k.norm(dim=-1).argsort(dim=-1)[..., :C].sort(dim=-1).values
    assert torch.equal(ours, lowest_norm)
    ref, _ = kvpress_chunkkv_keep(-k.norm(dim=-1), 20, 1 - (C + 0.5) / L)
    assert torch.equal(ours, ref)


# --- end to end through the model ---------------------------------------------------------------------------

@pytest.fixture(scope="module")
def model(reference_checkpoint):
    return Pythia.from_pretrained(reference_checkpoint("tiny", 0.25, True)[1]).for_inference()


@torch.no_grad()
def test_expected_attention_end_to_end_matches_kvpress_on_prerope_queries(model):
    """The model's own pre-rotary queries (captured at the fused QKV projection, before the model rotates
    them in place) fed to the transcription select what our policy selects from the cached, rotated ones."""
    c = model.config
    B, L, C = 2, 60, 20
    prompt = random_ids(model, B, L, 7)
    captured = {}

    def hook(layer):
        def capture(module, inputs, qkv):
            q = qkv.view(B, L, c.num_attention_heads, 3, c.head_size)[..., 0, :].transpose(1, 2)
            captured[layer] = q.clone()
        return capture

    handles = [block.attention.query_key_value.register_forward_hook(hook(i)) for i, block in enumerate(model.layers)]
    try:
        prefill = Prefill.record(model, prompt)
    finally:
        for h in handles:
            h.remove()
    ea = ExpectedAttention(max_capacity_prompt=C)
    cache = prefill.replay(model, ea)
    compared = tied = 0
    for i in range(c.num_hidden_layers):
        ref = kvpress_expected_attention_scores(captured[i], prefill.keys[i], prefill.values[i], 512, 4, True, True,
                                                0.0, c.rotary_ndims)
        ours = ea.score(i, prefill.keys[i], prefill.values[i], prefill.queries[i]).double()
        assert torch.allclose(ours[..., 4:], ref[..., 4:], rtol=1e-3, atol=1e-9)
        n = kept_sets_agree(cache.positions(i), ref, C)
        compared, tied = compared + n[0], tied + n[1]
    assert compared >= 3 * tied and compared > 0


POLICIES = {
    "expected_attention": lambda: ExpectedAttention(max_capacity_prompt=16),
    "expected_attention_plain": lambda: ExpectedAttention(max_capacity_prompt=16, n_future_positions=8,
                                                          use_covariance=False, use_vnorm=False, n_sink=0),
    "chunkkv_snapkv": lambda: ChunkKV(max_capacity_prompt=40, chunk_size=6),
    "chunkkv_h2o": lambda: ChunkKV(max_capacity_prompt=16, chunk_size=5, scorer="h2o"),
    "chunkkv_expected_attention": lambda: ChunkKV(max_capacity_prompt=16, chunk_size=4, scorer="expected_attention"),
}


@pytest.mark.parametrize("name", POLICIES)
@torch.no_grad()
def test_policy_end_to_end_then_decoding(model, name):
    L, steps = 64, 4
    prompt = random_ids(model, 1, L, 5)
    policy = POLICIES[name]()
    cache = model.new_cache(1, policy)
    logits = model(prompt, cache=cache)
    C = policy.max_capacity_prompt
    for i in range(model.config.num_hidden_layers):
        positions = cache.positions(i)
        assert positions.shape == (1, model.config.num_attention_heads, C)
        assert (positions.diff(dim=-1) > 0).all() and positions.min() >= 0 and positions.max() < L
    for _ in range(steps):
        logits = model(logits[:, -1:].argmax(-1), cache=cache)
        assert torch.isfinite(logits).all()
    assert cache.seen == L + steps and all(cache.length(i) == C + steps for i in range(model.config.num_hidden_layers))


@torch.no_grad()
def test_chunkkv_compresses_during_decoding_with_its_scorers_queries(model):
    policy = ChunkKV(max_capacity_prompt=16, chunk_size=4, scorer="h2o")
    assert policy.decode_queries() == policy.inner.decode_queries() == 8
    cache = model.new_cache(1, policy, decode_interval=4)
    logits = model(random_ids(model, 1, 40, 8), cache=cache)
    for _ in range(12):
        logits = model(logits[:, -1:].argmax(-1), cache=cache)
        assert torch.isfinite(logits).all() and 16 <= cache.length(0) <= 20
    assert cache.seen == 52


def test_expected_attention_refuses_decode_time_compression(model):
    with pytest.raises(ValueError, match="expected_attention cannot compress during decoding"):
        model.new_cache(1, ExpectedAttention(max_capacity_prompt=16), decode_interval=4)
    with pytest.raises(ValueError, match="chunkkv with scorer expected_attention: expected_attention cannot"):
        model.new_cache(1, ChunkKV(16, 4, "expected_attention"), decode_interval=4)


# --- settings -----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("make,message", [
    (lambda: ExpectedAttention(n_sink=-1), "n_sink must be >= 0"),
    (lambda: ExpectedAttention(n_sink=16, max_capacity_prompt=16), "n_sink.*smaller than max_capacity_prompt"),
    (lambda: ExpectedAttention(n_future_positions=0), "n_future_positions must be >= 1"),
    (lambda: ExpectedAttention(epsilon=-0.1), "epsilon must be a finite number >= 0"),
    (lambda: ExpectedAttention(epsilon=float("nan")), "epsilon must be a finite number >= 0"),
    (lambda: ExpectedAttention(max_capacity_prompt=0), "max_capacity_prompt must be >= 1"),
    (lambda: ExpectedAttention(8).score(0, *torch.zeros(3, 1, 1, 10, 4)), "needs the model's rotary settings"),
    (lambda: ExpectedAttention(8).decode_queries(), "expected_attention cannot compress during decoding"),
    (lambda: ChunkKV(scorer="nope"), "scorer must be a registered policy, got 'nope'"),
    (lambda: ChunkKV(scorer="chunkkv"), "scorer cannot be 'chunkkv'"),
    (lambda: ChunkKV(scorer="none"), "scorer cannot be 'none'"),
    (lambda: ChunkKV(chunk_size=0), "chunk_size must be >= 1"),
    (lambda: ChunkKV(max_capacity_prompt=0), "max_capacity_prompt must be >= 1"),
    (lambda: ChunkKV(max_capacity_prompt=16), "chunkkv's scorer snapkv .*window_size .* smaller than"),
    (lambda: ChunkKV(max_capacity_prompt=2, scorer="streaming_llm"), "chunkkv's scorer streaming_llm"),
    (lambda: ChunkKV(scorer="pyramidkv").decode_queries(), "chunkkv with scorer pyramidkv: pyramidkv cannot"),
])
def test_invalid_settings_say_what_is_allowed(make, message):
    with pytest.raises(ValueError, match=message):
        make()


def test_expected_attention_scores_prefills_only():
    ea = ExpectedAttention(8)
    ea.for_model(one_layer_config(1, 4))
    k = torch.zeros(1, 1, 10, 4)
    with pytest.raises(ValueError, match="scores a prefill"):
        ea.score(0, k, k, k[:, :, :3])


def test_registry_labels_and_delegation():
    assert COMPRESSORS["expected_attention"] is ExpectedAttention and COMPRESSORS["chunkkv"] is ChunkKV
    assert ExpectedAttention().label == "expected_attention_c512_future512_sink4_covTrue_vnormTrue_eps0.0"
    assert ChunkKV().label == "chunkkv_c512_chunk20_snapkv"
    assert build_compressor("chunkkv", {"scorer": "knorm", "chunk_size": 10}) == ChunkKV(chunk_size=10, scorer="knorm")
    # The scorer gets the budget when it has one, its defaults otherwise.
    assert ChunkKV(100, scorer="snapkv").inner == SnapKV(max_capacity_prompt=100)
    assert ChunkKV(100, scorer="knorm").inner == KnormPress()
    # What the scorer still needs, the model's config: passed on.
    assert "come after the prompt" in ChunkKV(scorer="oracle").missing_input()
    ck = ChunkKV(scorer="pyramidkv")
    ck.for_model(PythiaConfig(num_hidden_layers=3))
    assert ck.inner.num_layers == 3
    with pytest.raises(TypeError, match="chunkkv.scorer must be a policy"):
        ChunkKV(scorer=3)
