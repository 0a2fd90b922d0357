"""Compressors against independent references: SnapKV as in its original repository, KnormPress as in kvpress."""

import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from conftest import rotary_by_hand
from minipythia import COMPRESSORS, KVCache, KnormPress, NoCompression, Pythia, PythiaConfig, SnapKV
from minipythia.model import rotary_cos_sin

pytestmark = pytest.mark.usefixtures("single_thread")


def snapkv_update_kv(key_states, query_states, value_states, window_size, max_capacity_prompt, kernel_size,
                     pooling):
    """FasterDecoding/SnapKV `snapkv/monkeypatch/snapkv_utils.py`, SnapKVCluster.update_kv, transcribed
    (num_key_value_groups = 1: Pythia has no GQA). Also returns what the tests compare: the selected
    prefix indices (score order) and the pooled votes, or None, None when the prompt stays whole."""
    assert key_states.shape[-2] == query_states.shape[-2]
    bsz, num_heads, q_len, head_dim = query_states.shape
    if q_len < max_capacity_prompt:
        return key_states, value_states, None, None
    attn_weights = torch.matmul(query_states[..., -window_size:, :], key_states.transpose(2, 3)) / math.sqrt(head_dim)
    mask = torch.full((window_size, window_size), torch.finfo(attn_weights.dtype).min, device=attn_weights.device)
    mask_cond = torch.arange(mask.size(-1), device=attn_weights.device)
    mask.masked_fill_(mask_cond < (mask_cond + 1).view(mask.size(-1), 1), 0)
    mask = mask.to(attn_weights.device)
    attention_mask = mask[None, None, :, :]
    attn_weights[:, :, -window_size:, -window_size:] += attention_mask
    attn_weights = nn.functional.softmax(attn_weights, dim=-1, dtype=torch.float32).to(query_states.dtype)
    attn_weights_sum = attn_weights[:, :, -window_size:, :-window_size].sum(dim=-2)
    if pooling == "avgpool":
        attn_cache = F.avg_pool1d(attn_weights_sum, kernel_size=kernel_size, padding=kernel_size // 2, stride=1)
    elif pooling == "maxpool":
        attn_cache = F.max_pool1d(attn_weights_sum, kernel_size=kernel_size, padding=kernel_size // 2, stride=1)
    else:
        raise ValueError("Pooling method not supported")
    indices = attn_cache.topk(max_capacity_prompt - window_size, dim=-1).indices
    selected = indices
    indices = indices.unsqueeze(-1).expand(-1, -1, -1, head_dim)
    k_past_compress = key_states[:, :, :-window_size, :].gather(dim=2, index=indices)
    v_past_compress = value_states[:, :, :-window_size, :].gather(dim=2, index=indices)
    k_cur = key_states[:, :, -window_size:, :]
    v_cur = value_states[:, :, -window_size:, :]
    key_states = torch.cat([k_past_compress, k_cur], dim=2)
    value_states = torch.cat([v_past_compress, v_cur], dim=2)
    return key_states, value_states, selected, attn_cache


def assert_snapkv_selection(positions, keys, values, full_keys, full_values, query_states, snap: SnapKV):
    """Our kept positions (B, nh, n) and K, V against the reference run on the full prefill K, V.

    The sets must be equal. Where the (C-W)-th and (C-W+1)-th pooled votes are equal (max pooling copies
    one value onto up to k neighbours), which of the tied positions is taken is top-k's arbitrary choice
    in both implementations: there, every position voted above the tie must be kept and none below it.
    Returns the number of (batch, head) pairs that needed this tie rule."""
    W, C = snap.window_size, snap.max_capacity_prompt
    B, H, L, D = full_keys.shape
    ref_k, ref_v, selected, pooled = snapkv_update_kv(full_keys, query_states, full_values, W, C,
                                                      snap.kernel_size, snap.pooling)
    assert (positions.diff(dim=-1) > 0).all(), "kept entries must come in position order"
    if selected is None:
        assert torch.equal(positions, torch.arange(L).expand(B, H, L))
        assert torch.equal(keys, ref_k) and torch.equal(values, ref_v)
        return 0
    assert positions.shape == (B, H, C)
    assert torch.equal(positions[..., -W:], torch.arange(L - W, L).expand(B, H, W)), "the window is always kept"
    n_tied = 0
    for b in range(B):
        for h in range(H):
            ours = set(positions[b, h, :-W].tolist())
            ranked = pooled[b, h].sort(descending=True).values
            if C - W == L - W or ranked[C - W - 1] > ranked[C - W]:
                assert ours == set(selected[b, h].tolist()), (b, h)
                # Same entries as the reference keeps: it orders the prefix by score, we by position.
                order = selected[b, h].argsort()
                assert torch.equal(keys[b, h, :-W], ref_k[b, h, :-W][order])
                assert torch.equal(values[b, h, :-W], ref_v[b, h, :-W][order])
            else:
                n_tied += 1
                threshold = ranked[C - W - 1]
                above = set((pooled[b, h] > threshold).nonzero().flatten().tolist())
                below = set((pooled[b, h] < threshold).nonzero().flatten().tolist())
                assert above <= ours and not (ours & below) and len(ours) == C - W, (b, h)
    assert torch.equal(keys[..., -W:, :], ref_k[..., -W:, :])
    return n_tied


def compress_random(snap: SnapKV, B=2, H=3, L=64, D=16, seed=0, scale=1.0):
    """Random prefill K, V, Q stored in a one-layer cache and compressed with the shared selection step."""
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(B, H, L, D, generator=g) * scale for _ in range(3))
    config = PythiaConfig(vocab_size=8, hidden_size=H * D, num_hidden_layers=1, num_attention_heads=H,
                          intermediate_size=8)
    cache = KVCache(config, B, compressor=snap)
    cache.append(0, k, v)
    cache.compress(0, q)
    return cache, q, k, v


# (L, window, capacity): longer than the capacity, one longer, equal, shorter, and windows over half the prompt.
SNAP_SHAPES = [(64, 8, 24), (33, 4, 32), (32, 4, 32), (20, 4, 32), (40, 30, 36), (70, 32, 40), (16, 1, 2)]


@pytest.mark.parametrize("L,W,C", SNAP_SHAPES)
@pytest.mark.parametrize("kernel_size", [1, 3, 5, 7])
@pytest.mark.parametrize("pooling", ["avgpool", "maxpool"])
def test_snapkv_matches_reference_on_random_tensors(L, W, C, kernel_size, pooling):
    snap = SnapKV(window_size=W, max_capacity_prompt=C, kernel_size=kernel_size, pooling=pooling)
    cache, q, k, v = compress_random(snap, L=L, scale=2.0)
    n_tied = assert_snapkv_selection(cache.positions(0), cache.keys(0), cache.values(0), k, v, q, snap)
    if pooling == "avgpool" or kernel_size == 1:
        assert n_tied == 0  # continuous votes: the exact comparison ran everywhere
    assert cache.length(0) == (L if L < C else C)


@pytest.mark.parametrize("kernel_size", [3, 5])
@pytest.mark.parametrize("pooling", ["avgpool", "maxpool"])
def test_snapkv_score_is_the_pooled_vote(kernel_size, pooling):
    """score() returns the reference's pooled votes for the prefix (avg pool counts its zero padding),
    and ranks the window above every prefix entry."""
    B, H, L, D, W, C = 2, 3, 50, 16, 8, 20
    g = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(B, H, L, D, generator=g) for _ in range(3))
    snap = SnapKV(window_size=W, max_capacity_prompt=C, kernel_size=kernel_size, pooling=pooling)
    scores = snap.score(0, k, v, q)
    _, _, _, pooled = snapkv_update_kv(k, q, v, W, C, kernel_size, pooling)
    assert scores.shape == (B, H, L)
    assert (scores[..., : L - W] - pooled).abs().max() <= 1e-6
    assert (scores[..., L - W :].min(dim=-1).values > scores[..., : L - W].max(dim=-1).values).all()


def test_snapkv_avg_and_max_pooling_keep_different_entries():
    """Votes built to separate the two poolings: an isolated spike (1.0 at position 5) and a ridge
    (0.6, 0.7, 0.6 at 20-22) over a low background. With kernel 3 and room for 3 prefix entries, max
    pooling keeps the spike's neighbourhood (4, 5, 6: pooled 1.0 against the ridge's 0.7); average
    pooling keeps the ridge (pooled 0.63 and 0.44 against the spike's 0.34)."""
    D, W, prefix = 8, 4, 40
    g = torch.Generator().manual_seed(0)
    votes = 0.01 + 0.001 * torch.rand(prefix, generator=g)
    votes[5], votes[20:23] = 1.0, torch.tensor([0.6, 0.7, 0.6])
    # Unit queries along e0 scaled by sqrt(D): query . key / sqrt(D) is the key's e0 coordinate, so the
    # attention to prefix key j is proportional to votes[j]; window keys get a negligible exp(-40).
    e0 = torch.zeros(D)
    e0[0] = 1.0
    logits = torch.cat((votes.log(), torch.full((W,), -40.0)))
    k = (logits[:, None] * e0).expand(1, 1, -1, -1).contiguous()  # (1, 1, L, D)
    q = (math.sqrt(D) * e0).expand(1, 1, prefix + W, D).contiguous()
    v = torch.randn(1, 1, prefix + W, D, generator=g)
    window = list(range(prefix, prefix + W))
    expected = {"maxpool": [4, 5, 6] + window, "avgpool": [20, 21, 22] + window}
    for pooling, kept in expected.items():
        snap = SnapKV(window_size=W, max_capacity_prompt=3 + W, kernel_size=3, pooling=pooling)
        config = PythiaConfig(vocab_size=8, hidden_size=D, num_hidden_layers=1, num_attention_heads=1,
                              intermediate_size=8)
        cache = KVCache(config, 1, compressor=snap)
        cache.append(0, k, v)
        cache.compress(0, q)
        assert cache.positions(0)[0, 0].tolist() == kept, pooling
        assert_snapkv_selection(cache.positions(0), cache.keys(0), cache.values(0), k, v, q, snap)


def test_snapkv_selects_per_batch_and_head():
    snap = SnapKV(window_size=8, max_capacity_prompt=24, kernel_size=5)
    cache, *_ = compress_random(snap, B=2, H=4, L=64)
    prefix = cache.positions(0)[..., :-8]
    assert len({tuple(p.tolist()) for p in prefix.reshape(-1, 16)}) == 8  # all 2x4 selections differ


# --- end to end: prefill a real model with a compressor, check what the cache kept ------------------------

@pytest.fixture(scope="module")
def model(reference_checkpoint):
    return Pythia.from_pretrained(reference_checkpoint("tiny", 0.25, True)[1]).for_inference()


def prefill_qkv_by_hand(model, ids):
    """Per layer, the prefill's q, k, v (B, nh, L, hs) after rotary, recomputed by hand from the layer's
    weights and its input hidden state. The hidden states come from the model's own blocks (whose
    agreement with transformers test_model_parity checks), so the recomputed q, k, v are bit for bit those
    the model cached: the selections can be compared exactly, with no near-tie flips from float noise."""
    c, sd = model.config, model.state_dict()
    B, L = ids.shape
    x = model.embed_in(ids)
    cos, sin = rotary_cos_sin(c, 0, L, x.device, x.dtype)
    out = []
    for i, block in enumerate(model.layers):
        p = f"layers.{i}."
        h = F.layer_norm(x, (c.hidden_size,), sd[p + "input_layernorm.weight"], sd[p + "input_layernorm.bias"],
                         c.layer_norm_eps)
        qkv = F.linear(h, sd[p + "attention.query_key_value.weight"], sd[p + "attention.query_key_value.bias"])
        qkv = qkv.view(B, L, c.num_attention_heads, 3, c.head_size).transpose(1, 2)  # (B, nh, L, 3, hs)
        q, k, v = qkv.unbind(3)
        out.append((rotary_by_hand(q, range(L), c), rotary_by_hand(k, range(L), c), v))
        x = block(x, cos, sin, None)
    return out


@pytest.mark.parametrize("kernel_size", [3, 5, 7])
@pytest.mark.parametrize("pooling", ["avgpool", "maxpool"])
@torch.no_grad()
def test_snapkv_end_to_end_matches_reference(model, kernel_size, pooling):
    B, L, W, C = 2, 48, 8, 20
    ids = torch.randint(0, model.config.vocab_size, (B, L), generator=torch.Generator().manual_seed(kernel_size))
    snap = SnapKV(window_size=W, max_capacity_prompt=C, kernel_size=kernel_size, pooling=pooling)
    cache = model.new_cache(B, compressor=snap)
    model(ids, cache=cache)
    n_tied = 0
    for i, (q, k, v) in enumerate(prefill_qkv_by_hand(model, ids)):
        positions = cache.positions(i)
        n_tied += assert_snapkv_selection(positions, cache.keys(i), cache.values(i), k, v, q, snap)
        assert len({tuple(p.tolist()) for p in positions.reshape(-1, C)}) > 1, "selection is per head"
    if pooling == "avgpool":
        assert n_tied == 0


@pytest.mark.parametrize("ratio", [0.0, 0.1, 0.5, 0.75, 0.99])
@pytest.mark.parametrize("skip_layers", [(), (0,), (0, 1)])
@torch.no_grad()
def test_knorm_keeps_the_lowest_norm_keys(model, ratio, skip_layers):
    B, L = 2, 30
    # Distinct tokens: rotary preserves norms, so a repeated token's layer-0 keys would tie.
    g = torch.Generator().manual_seed(2)
    ids = torch.stack([torch.randperm(model.config.vocab_size, generator=g)[:L] for _ in range(B)])
    full = model.new_cache(B)
    model(ids, cache=full)
    cache = model.new_cache(B, compressor=KnormPress(compression_ratio=ratio, skip_layers=skip_layers))
    model(ids, cache=cache)
    n_keep = max(1, int(L * (1 - ratio)))  # kvpress: int(L * (1 - compression_ratio)) entries survive
    for i in range(model.config.num_hidden_layers):
        positions = cache.positions(i)
        if i in skip_layers or ratio == 0.0:
            assert torch.equal(positions, torch.arange(L).expand_as(positions))
            assert torch.equal(cache.keys(i), full.keys(i)) and torch.equal(cache.values(i), full.values(i))
            continue
        norms = full.keys(i).double().norm(dim=-1).sort(dim=-1)  # (B, nh, L), ascending
        assert (norms.values[..., n_keep] - norms.values[..., n_keep - 1] > 1e-5).all()  # no near-tie at the cut
        expected = norms.indices[..., :n_keep].sort(dim=-1).values
        assert torch.equal(positions, expected)
        gather = expected.unsqueeze(-1).expand(-1, -1, -1, model.config.head_size)
        assert torch.equal(cache.keys(i), full.keys(i).gather(2, gather))
        assert torch.equal(cache.values(i), full.values(i).gather(2, gather))
        if 1 < n_keep < L:
            assert len({tuple(p.tolist()) for p in positions.reshape(-1, n_keep)}) > 1, "selection is per head"


@torch.no_grad()
def test_no_compression_keeps_everything(model):
    B, L = 2, 25
    ids = torch.randint(0, model.config.vocab_size, (B, L + 3), generator=torch.Generator().manual_seed(3))
    plain, none = model.new_cache(B), model.new_cache(B, compressor=NoCompression())
    for cache in (plain, none):
        model(ids[:, :L], cache=cache)
    for i in range(model.config.num_hidden_layers):
        assert torch.equal(none.positions(i), torch.arange(L).expand(B, model.config.num_attention_heads, L))
        assert torch.equal(none.keys(i), plain.keys(i)) and torch.equal(none.values(i), plain.values(i))
    for t in range(L, L + 3):
        assert torch.equal(model(ids[:, t : t + 1], cache=none), model(ids[:, t : t + 1], cache=plain))


@pytest.mark.parametrize("make,message", [
    (lambda: SnapKV(kernel_size=4), "odd"),
    (lambda: SnapKV(kernel_size=0), "odd"),
    (lambda: SnapKV(window_size=32, max_capacity_prompt=32), "window_size.*smaller than max_capacity_prompt"),
    (lambda: SnapKV(window_size=64, max_capacity_prompt=32), "window_size.*smaller than max_capacity_prompt"),
    (lambda: SnapKV(window_size=0), "window_size must be >= 1"),
    (lambda: SnapKV(pooling="meanpool"), "one of 'avgpool', 'maxpool'"),
    (lambda: KnormPress(compression_ratio=1.0), r"\[0, 1\)"),
    (lambda: KnormPress(compression_ratio=-0.1), r"\[0, 1\)"),
    (lambda: KnormPress(compression_ratio=1.5), r"\[0, 1\)"),
])
def test_invalid_settings_say_what_is_allowed(make, message):
    with pytest.raises(ValueError, match=message):
        make()


def test_registry_and_labels():
    # The full registry, with the policies of test_policies.py, is checked there.
    assert {k: COMPRESSORS[k] for k in ("none", "knorm", "snapkv")} == {"none": NoCompression, "knorm": KnormPress,
                                                                     "snapkv": SnapKV}
    assert SnapKV().label == "snapkv_w32_c512_k5_avgpool"  # the design's recommended setting
    assert KnormPress(0.25, skip_layers=[0, 1]).label == "knorm_r0.25_skip0-1"
    assert NoCompression().label == "none"
