"""Merging (CaM, Zhang et al. 2024): evicted values merged into the entries that follow them, by hand.

The rule is checked against a test-side transcription of the official merge, then by its defining
properties (the scorer's positions, nothing merged within budget, what the merge conserves, the mean of
the official Bernoulli sampling), then end to end on a reference checkpoint.
"""

import pytest
import torch
from conftest import causal_attention
from eval.ppl import sliding_window_nll
from minipythia import H2O, KVCache, Pythia, PythiaConfig, StreamingLLM, TOVA, build_compressor, generate
from minipythia.compressors import COMPRESSORS
from minipythia.compressors.merging import Merging, merge_probability, merge_values, received_attention
from minipythia.compressors.registry import decoding_policies
from minipythia.prefill import Prefill

pytestmark = pytest.mark.usefixtures("single_thread")


def random_qkv(B, H, L, D, seed):
    g = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(B, H, L, D, generator=g) * 1.5 for _ in range(3))


def received_by_hand(q, k):
    """float64: the attention each key received, summed over the queries (those of the last positions)."""
    return causal_attention(q, k).sum(dim=-2)


def cam_by_hand(values, received, evicted, m):
    """CaM's merge written out per (batch, head) in float64; every position's value afterwards.

    Transcribed from the official loop, zyxxmu/cam `cam_hf/utils_lm_eval/modify_gptneox_cam.py`
    (local_cam_mask): each evicted token j, in position order, adds M * V[j] / m to V[j+1 : j+m+1], in
    place, so that what it adds includes what earlier tokens added to it. The merge probability is the
    paper's (Eq. 14) as in `generate_task/streaming_llm/kv_cache_cam.py` (slicev) and NVIDIA kvpress
    `kvpress/presses/cam_press.py`: clamp(A_j / mean of A over the receivers, 0, 1), nan -> 0, inf -> 1.
    Ours: M ~ Bernoulli(p) is replaced by its expectation p, and near the end V[j] is split among the
    receivers there are (kvpress divides by their number too)."""
    v = values.double().clone()
    B, H, L, _ = v.shape
    for b in range(B):
        for h in range(H):
            for j in range(L):
                targets = list(range(j + 1, min(j + m, L - 1) + 1))
                if not evicted[b, h, j] or not targets:
                    continue
                own = received[b, h, j].item()
                reference = sum(received[b, h, t].item() for t in targets) / len(targets)
                p = min(1.0, own / reference) if reference > 0 else (1.0 if own > 0 else 0.0)
                for t in targets:
                    v[b, h, t] += p * v[b, h, j] / len(targets)
    return v


def compressed(compressor, q, k, v):
    """One layer of a cache filled with (q, k, v) and compressed, as the prefill does."""
    B, H, _, D = q.shape
    config = PythiaConfig(vocab_size=8, hidden_size=H * D, num_hidden_layers=1, num_attention_heads=H,
                          intermediate_size=8)
    cache = KVCache(config, B, compressor=compressor)
    cache.append(0, k, v)
    cache.compress(0, q)
    return cache


def gathered(x, idx):
    return x.gather(2, idx.unsqueeze(-1).expand(-1, -1, -1, x.size(-1)))


def evicted_of(positions, L):
    return torch.ones(positions.shape[:2] + (L,), dtype=torch.bool).scatter_(-1, positions, False)


# --- the rule, against the transcription ---------------------------------------------------------------------

@pytest.mark.parametrize("B,H,L,D,C,m,scorer,seed", [
    (2, 3, 40, 16, 12, 4, "streaming_llm", 0),
    (1, 2, 33, 8, 10, 1, "h2o", 1),
    (2, 2, 50, 8, 20, 7, "tova", 2),
    (1, 3, 24, 8, 6, 30, "keydiff", 3),  # m beyond the prompt: every follower receives
    (2, 2, 37, 4, 9, 5, "random", 4),  # evicts the last entries too: the end of the cache
])
def test_kept_values_follow_the_official_rule(B, H, L, D, C, m, scorer, seed):
    q, k, v = random_qkv(B, H, L, D, seed)
    policy = Merging(max_capacity_prompt=C, scorer=scorer, merge_budget=m)
    cache = compressed(policy, q, k, v)
    plain = compressed(build_compressor(scorer, {"max_capacity_prompt": C}), q, k, v)
    positions = cache.positions(0)
    assert torch.equal(positions, plain.positions(0)), "the kept positions are exactly the scorer's"
    assert torch.equal(cache.keys(0), gathered(k, positions)), "keys are not merged"
    expected = gathered(cam_by_hand(v, received_by_hand(q, k), evicted_of(positions, L), m), positions)
    torch.testing.assert_close(cache.values(0).double(), expected, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(cache.values(0), plain.values(0))


def test_streaming_window_of_m_entries_is_the_official_loop():
    """StreamingLLM keeps s sinks and a window of r = C - s; with m = r our merge is, given the same
    probabilities, the official loop over the tokens leaving the window, token_index = s + r .. L - 1."""
    B, H, L, D, s, r = 2, 3, 45, 8, 4, 9  # s: the scorer's default n_sink
    q, k, v = random_qkv(B, H, L, D, 5)
    cache = compressed(Merging(max_capacity_prompt=s + r, scorer="streaming_llm", merge_budget=r), q, k, v)
    evicted = evicted_of(cache.positions(0), L)
    assert evicted[..., list(range(s, L - r))].all() and evicted.sum(-1).eq(L - s - r).all()
    p = merge_probability(received_attention(k, q), evicted, r)
    official = v.double().clone()
    for token_index in range(s + r, L):  # zyxxmu/cam cam_hf/utils_lm_eval/modify_gptneox_cam.py, local_cam_mask
        j = token_index - r
        official[:, :, j + 1 : j + r + 1] += (p[:, :, j, None, None] * official[:, :, j : j + 1]) / r
    torch.testing.assert_close(cache.values(0).double(), gathered(official, cache.positions(0)), rtol=1e-5, atol=1e-5)


def test_the_expectation_is_the_mean_of_the_official_sampling():
    """The official code merges each evicted token with probability p (M ~ Bernoulli(p)); averaged over
    many draws, its merged values are ours."""
    H, L, D, m, N = 2, 14, 4, 3, 20000
    g = torch.Generator().manual_seed(6)
    values = torch.randn(1, H, L, D, generator=g)
    evicted = torch.zeros(1, H, L, dtype=torch.bool)
    evicted[..., 2:11] = True
    prob = torch.where(evicted, torch.rand(1, H, L, generator=g), 0.0)
    sampled = values.double().expand(N, H, L, D).clone()
    masks = torch.bernoulli(prob.double().expand(N, H, L), generator=g)
    for j in range(2, 11):  # every evicted token has its m followers here
        sampled[:, :, j + 1 : j + m + 1] += (masks[:, :, j, None, None] * sampled[:, :, j : j + 1]) / m
    ours = merge_values(values, prob, m)[0].double()
    error = sampled.std(dim=0) / N**0.5
    assert ((sampled.mean(dim=0) - ours).abs() <= 5 * error + 1e-6).all()
    assert (error[:, 3:] > 0).any(), "the draws differ: the test is not vacuous"


# --- defining properties ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("L", [10, 16])
def test_nothing_is_merged_within_budget(L):
    q, k, v = random_qkv(2, 2, L, 8, 7)
    policy = Merging(max_capacity_prompt=16, scorer="h2o", merge_budget=4)
    cache = compressed(policy, q, k, v)
    assert torch.equal(cache.values(0), v) and torch.equal(cache.keys(0), k)
    everything = torch.arange(L).expand(2, 2, L)
    assert torch.equal(policy.kept_values(0, k, v, q, everything), v)


@pytest.mark.parametrize("seed,m", [(8, 1), (9, 4), (10, 50)])
def test_merge_conserves_the_sum_of_values_but_what_the_mask_withholds(seed, m):
    """Each evicted entry hands on p times its (merged) value, split among its receivers, and the rest is
    lost with it: sum(kept) + sum over evicted (1 - p) * merged = sum(all values), per channel. With p = 1
    everywhere (and the last entry kept) the kept entries hold the sum of all values."""
    B, H, L, D = 2, 3, 30, 4
    q, k, v = random_qkv(B, H, L, D, seed)
    g = torch.Generator().manual_seed(seed)
    evicted = torch.rand(B, H, L, generator=g) < 0.6
    prob = merge_probability(received_attention(k, q), evicted, m)
    merged = merge_values(v, prob, m).double()
    kept = (merged * ~evicted[..., None]).sum(2)
    lost = (((1 - prob.double()) * evicted)[..., None] * merged).sum(2)
    torch.testing.assert_close(kept + lost, v.double().sum(2), rtol=1e-5, atol=1e-5)
    evicted[..., -1] = False
    always = merge_values(v, evicted.float(), m).double()
    torch.testing.assert_close((always * ~evicted[..., None]).sum(2), v.double().sum(2), rtol=1e-5, atol=1e-5)


def test_merge_probability_edge_cases():
    """clamp(A_i / mean of the receivers', 0, 1): 0/0 -> 0, x/0 -> 1; kept entries and the last get 0."""
    received = torch.tensor([[[0.0, 0.0, 2.0, 0.0, 0.0, 1.0, 3.0, 6.0]]])
    evicted = torch.tensor([[[True, True, True, False, True, True, True, True]]])
    p = merge_probability(received, evicted, 2)[0, 0].tolist()
    # receivers: 0 -> (1, 2) mean 1; 1 -> (2, 3) mean 1; 2 -> (3, 4) mean 0; 4 -> (5, 6) mean 2;
    # 5 -> (6, 7) mean 4.5; 6 -> (7,) mean 6; 7 -> none
    assert p == pytest.approx([0.0, 0.0, 1.0, 0.0, 0.0, 1 / 4.5, 0.5, 0.0])


def test_received_attention_is_the_column_sum_whatever_the_chunking(monkeypatch):
    from minipythia.compressors import merging

    q, k, _ = random_qkv(2, 2, 30, 8, 11)
    for chunk in (7, 256):
        monkeypatch.setattr(merging, "QUERY_CHUNK", chunk)
        torch.testing.assert_close(received_attention(k, q).double(), received_by_hand(q, k), rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(received_attention(k, q[:, :, -5:]).double(), received_by_hand(q[:, :, -5:], k),
                                   rtol=1e-5, atol=1e-6)


# --- end to end ------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def model(reference_checkpoint):
    return Pythia.from_pretrained(reference_checkpoint("tiny", 0.25, True)[1]).for_inference()  # 2 layers, 4 heads


def token_ids(model, B, T, seed):
    return torch.randint(0, model.config.vocab_size, (B, T), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("scorer", ["h2o", "streaming_llm"])
@torch.no_grad()
def test_end_to_end_merges_only_into_receivers_then_decodes(model, scorer):
    B, L, C, m, steps = 2, 48, 20, 4, 4
    ids = token_ids(model, B, L, 12)
    policy = Merging(max_capacity_prompt=C, scorer=scorer, merge_budget=m)
    cache = model.new_cache(B, policy)
    logits = model(ids, cache=cache)
    plain = model.new_cache(B, build_compressor(scorer, {"max_capacity_prompt": C}))
    model(ids, cache=plain)
    prefill = Prefill.record(model, ids)
    for i in range(model.config.num_hidden_layers):
        positions = cache.positions(i)
        assert positions.shape == (B, model.config.num_attention_heads, C)
        assert torch.equal(positions, plain.positions(i)) and torch.equal(cache.keys(i), plain.keys(i))
        # A kept entry receives iff an evicted one lies among the m before it (attention is never 0).
        evicted = evicted_of(positions, L)
        before = torch.stack([torch.roll(evicted, d, -1) & (torch.arange(L) >= d) for d in range(1, m + 1)]).any(0)
        changed = (cache.values(i) != plain.values(i)).any(-1)
        assert torch.equal(changed, before.gather(-1, positions)) and changed.any()
        expected = cam_by_hand(prefill.values[i], received_by_hand(prefill.queries[i], prefill.keys[i]), evicted, m)
        torch.testing.assert_close(cache.values(i).double(), gathered(expected, positions), rtol=1e-4, atol=1e-4)
    for _ in range(steps):
        logits = model(logits[:, -1:].argmax(-1), cache=cache)
        assert torch.isfinite(logits).all()
    assert cache.seen == L + steps and all(cache.length(i) == C + steps for i in range(model.config.num_hidden_layers))
    out = generate(model, ids[0].tolist(), max_new_tokens=3, compressor=policy)
    assert len(out.tokens) == 3 and out.kept_after_prefill == C


@pytest.mark.parametrize("scorer,queries", [("h2o", 8), ("streaming_llm", 1), ("tova", 1)])
@torch.no_grad()
def test_compresses_during_decoding(model, scorer, queries):
    policy = Merging(max_capacity_prompt=16, scorer=scorer, merge_budget=4)
    assert policy.decode_queries() == queries  # the scorer's, and at least the newest for the merge
    cache = model.new_cache(1, policy, decode_interval=4)
    logits = model(token_ids(model, 1, 40, 13), cache=cache)
    for _ in range(12):
        logits = model(logits[:, -1:].argmax(-1), cache=cache)
        assert torch.isfinite(logits).all() and 16 <= cache.length(0) <= 20
    assert cache.seen == 52


@torch.no_grad()
def test_sliding_window_nll_differs_from_the_scorer_alone(model):
    ids = token_ids(model, 1, 150, 14)[0]
    for scorer in (H2O(max_capacity_prompt=24), StreamingLLM(max_capacity_prompt=24), TOVA(max_capacity_prompt=24)):
        alone = sliding_window_nll(model, ids, 64, 16, scorer)
        merged = sliding_window_nll(model, ids, 64, 16, Merging(max_capacity_prompt=24, scorer=scorer.name,
                                                                merge_budget=8))
        assert merged.shape == alone.shape and torch.isfinite(merged).all()
        assert torch.equal(merged[:64], alone[:64])  # the first window has no prompt; then the prefill's target
        assert not torch.equal(merged, alone)
    within = Merging(max_capacity_prompt=48, scorer="h2o")  # prompts of 48 tokens: nothing evicted
    assert torch.equal(sliding_window_nll(model, ids, 64, 16, within), sliding_window_nll(model, ids, 64, 16))


# --- settings ---------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("settings,message", [
    (dict(scorer="nope"), "scorer must be a registered policy, got 'nope'"),
    (dict(scorer="merging"), "scorer cannot be 'merging': merging cannot be its own scorer"),
    (dict(scorer="none"), "scorer cannot be 'none': it keeps every entry"),
    (dict(scorer="think"), "scorer cannot be 'think': it prunes key channels"),
    (dict(merge_budget=0), "merge_budget must be >= 1"),
    (dict(max_capacity_prompt=0), "max_capacity_prompt must be >= 1"),
    (dict(max_capacity_prompt=16, scorer="snapkv"), "merging's scorer snapkv .* cannot be built: window_size"),
])
def test_bad_settings_raise(settings, message):
    with pytest.raises(ValueError, match=message):
        Merging(**settings)


def test_settings_types_registry_and_label(model):
    with pytest.raises(TypeError):
        Merging(merge_budget="4")
    policy = build_compressor("merging", {"max_capacity_prompt": 64, "scorer": "h2o", "merge_budget": 8})
    assert isinstance(policy, Merging) and isinstance(policy.inner, H2O) and policy.inner.max_capacity_prompt == 64
    assert COMPRESSORS["merging"] is Merging and "merging" in decoding_policies()
    assert Merging().label == "merging_c512_streaming_llm_m32" and policy.label == "merging_c64_h2o_m8"
    with pytest.raises(ValueError, match="merging with scorer pyramidkv: pyramidkv cannot compress during decoding"):
        model.new_cache(1, Merging(max_capacity_prompt=64, scorer="pyramidkv"), decode_interval=4)


def test_a_sweep_does_not_take_a_merging_cache_for_its_scorers():
    """Caches of one prefill that kept the same positions share their figures only when neither alters its
    entries (eval.replay.Kept): merging, quantizing or pruning does, so each is scored on its own."""
    from eval.ppl import sliding_window_nll, sliding_window_nlls
    from minipythia import H2O, NoCompression, Pythia
    from minipythia.weights import EMBEDDED_MODEL

    model = Pythia.from_pretrained(EMBEDDED_MODEL).for_inference()
    ids = torch.randint(0, 8000, (200,), generator=torch.Generator().manual_seed(0))
    configs = [H2O(max_capacity_prompt=24), Merging(max_capacity_prompt=24, scorer="h2o", merge_budget=8),
               NoCompression(kv_bits=4, kv_group_size=16, kv_residual=16), NoCompression()]  # (48-token prompts)
    shared = sliding_window_nlls(model, ids, 64, 16, configs)
    for config, nll in zip(configs, shared):
        assert torch.equal(nll, sliding_window_nll(model, ids, 64, 16, config)), config.label
    assert not torch.equal(shared[0], shared[1]) and not torch.equal(shared[2], shared[3])
