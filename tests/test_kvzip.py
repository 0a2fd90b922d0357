"""KVzip against a test-side transcription of the official scoring, its defining rules by hand, then end to
end through the model, the replay of a recorded prefill, decoding and the sliding-window eval.

The transcription is written from a reading of the authors' snu-mllab/KVzip (`model/wrapper.py`
ModelKVzip.self_task and .scoring, `attention/score.py` KVScore._get_score and _threshold_uniform) and
of NVIDIA kvpress (`kvpress/presses/kvzip_press.py`, KVzipPress.prepare and .score_kvzip, for the n_sink
first tokens it always keeps), in float64, on queries and keys of its own forward: one uncompressed
forward of prompt + reconstruction per chunk (the official cache holds both when it scores). Kept sets are
compared exactly wherever the reference leaves no near-tie at the cut.
"""

import math

import pytest
import torch
from minipythia import (COMPRESSORS, KVCache, NoCompression, Prefill, Prompt, Pythia, PythiaConfig, build_compressor,
                        generate)
from minipythia.compressors.base import attention_weights
from minipythia.compressors.kvzip import KVzip, reconstruction_attention

from conftest import kept_sets_agree, random_ids

pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.fixture(scope="module")
def model(reference_checkpoint):
    return Pythia.from_pretrained(reference_checkpoint("tiny", 0.25, True)[1]).for_inference()


# --- the official rule, transcribed --------------------------------------------------------------------------

def official_reconstruction_inputs(ctx_ids, chunk_size, prev_postfix_size, instruction_ids):
    """snu-mllab/KVzip model/wrapper.py, chunk_fn + ModelKVzip.self_task: the prompt in chunks of chunk_size;
    chunk i is reconstructed by [instruction] (+ the last prev_postfix_size ids of chunk i-1 for i > 0)
    (+ the template's postfix) + chunk i. The instruction texts and the chat postfix are what Pythia lacks:
    `instruction_ids` stands for both (our separator, or nothing)."""
    L = ctx_ids.shape[1]
    chunks = [ctx_ids[:, s : s + chunk_size] for s in range(0, L, chunk_size)] if L > chunk_size else [ctx_ids]
    out = []
    for i, a in enumerate(chunks):
        q = instruction_ids.expand(a.size(0), -1)
        if i > 0:
            q = torch.cat([q, chunks[i - 1][:, -prev_postfix_size:]], dim=1)
        out.append((a, torch.cat([q, a], dim=1)))
    return out


def official_chunk_scores(queries, keys, sink, start, end):
    """snu-mllab/KVzip attention/score.py, KVScore._get_score (= kvpress score_kvzip), for one layer:
    queries (B, H, q_len, d) of the reconstruction, keys (B, H, k, d) of the whole cache (prompt, then the
    reconstruction last). Keys subsampled to sinks + chunk + the reconstruction's own; a causal mask on the
    last q_len x q_len block; softmax; the chunk's columns; max over the queries (and the GQA group, of one
    head here). Float64."""
    B, H, q_len, d = queries.shape
    k = torch.cat([keys[:, :, :sink], keys[:, :, start:end], keys[:, :, -q_len:]], dim=2).double()
    attn = queries.double() @ k.transpose(-1, -2) / math.sqrt(d)
    mask = torch.full((q_len, q_len), torch.finfo(attn.dtype).min, dtype=attn.dtype)
    cond = torch.arange(q_len)
    mask.masked_fill_(cond < (cond + 1).view(q_len, 1), 0)
    attn[..., -q_len:, -q_len:] += mask
    attn = attn.softmax(dim=-1)[..., sink : sink + end - start]
    return attn.amax(dim=-2)  # (B, H, end - start)


def official_scores(model, prompt, chunk_size, prev_postfix_size, n_sink, separator_id):
    """Per layer (B, H, L): ModelKVzip.scoring's loop over chunks (start, end advance chunk by chunk; the
    sink is kvpress's min(n_sink, start)), each chunk's queries and keys from an uncompressed forward of
    prompt + its reconstruction; then kvpress's score_val[..., :n_sink] = 1 (always kept)."""
    B, L = prompt.shape
    instruction = torch.tensor([[separator_id]] if separator_id is not None else [[]], dtype=torch.long)
    scores = [torch.zeros(B, model.config.num_attention_heads, L, dtype=torch.float64)
              for _ in range(model.config.num_hidden_layers)]
    end = 0
    for chunk, repeat in official_reconstruction_inputs(prompt, chunk_size, prev_postfix_size, instruction):
        start, end = end, end + chunk.shape[1]
        rec = Prefill.record(model, torch.cat([prompt, repeat], dim=1))
        T = repeat.shape[1]
        for layer, s in enumerate(scores):
            s[..., start:end] = official_chunk_scores(rec.queries[layer][:, :, -T:], rec.keys[layer],
                                                      min(n_sink, start), start, end)
    for s in scores:
        s[..., :n_sink] = 1.0
    return scores


@pytest.mark.parametrize("B,L,C,chunk_size,n_sink,separator_id", [
    (1, 40, 16, 2000, 4, 0),  # one chunk, the defaults
    (2, 33, 8, 2000, 0, None),  # no sinks, no separator, two rows
    (1, 60, 24, 16, 4, 0),  # four chunks, each after the previous one's last 8 tokens
    (1, 50, 12, 7, 2, 5),  # chunks shorter than the carry: the whole previous chunk is carried
])
@torch.no_grad()
def test_kept_entries_match_the_official_scoring(model, B, L, C, chunk_size, n_sink, separator_id):
    prompt = random_ids(model, B, L, seed=L)
    policy = KVzip(max_capacity_prompt=C, n_sink=n_sink, chunk_size=chunk_size, separator_id=separator_id)
    cache = model.new_cache(B, policy)
    model(prompt, cache=cache)
    reference = official_scores(model, prompt, chunk_size, 8, n_sink, separator_id)
    compared = tied = 0
    for layer, ref in enumerate(reference):
        assert cache.positions(layer).shape == (B, model.config.num_attention_heads, C)
        assert (cache.positions(layer)[..., :n_sink] == torch.arange(n_sink)).all()
        c, t = kept_sets_agree(cache.positions(layer), ref, C, rel_gap=1e-4)
        compared, tied = compared + c, tied + t
        # The scores themselves, not only the ranking (float32 against float64, two different forwards).
        ours = policy.reconstruction_scores[layer][..., n_sink:].double()
        assert (ours - ref[..., n_sink:]).abs().max() < 1e-5
    assert compared >= 3 * (compared + tied) // 4, (compared, tied)


# --- the defining rules, by hand -----------------------------------------------------------------------------

def test_reconstruction_attention_on_hand_made_tensors():
    """Zero queries attend uniformly to what they see: the S sinks, the n chunk keys and the reconstruction's
    keys up to their own; the score is the largest weight, that of the first query, 1 / (S + n + 1)."""
    S, n, T, d = 2, 5, 3, 4
    scores = reconstruction_attention(torch.zeros(1, 1, T, d), torch.randn(1, 1, S, d), torch.randn(1, 1, n, d),
                                      torch.randn(1, 1, T, d))
    assert torch.allclose(scores, torch.full((1, 1, n), 1 / (S + n + 1)))
    # A query aligned with one chunk key gives it (nearly) all its attention; the other keys get little.
    q = torch.zeros(1, 1, 1, d)
    q[..., 0] = 40.0
    k = torch.zeros(1, 1, n, d)
    k[0, 0, 3, 0] = 1.0
    scores = reconstruction_attention(q, torch.zeros(1, 1, 0, d), k, torch.zeros(1, 1, 1, d))
    assert scores[0, 0].argmax() == 3 and scores[0, 0, 3] > 0.99


def former_reconstruction_attention(queries, sink_keys, chunk_keys, repeat_keys):
    """The implementation before the scores were computed a block of queries at a time: the whole (T, S + n + T)
    float32 matrix, the reconstruction's later tokens masked, softmax, the chunk's columns, max over queries."""
    S, n, T = sink_keys.size(2), chunk_keys.size(2), repeat_keys.size(2)
    keys = torch.cat((sink_keys, chunk_keys, repeat_keys), dim=2).float()
    logits = queries.float() @ keys.transpose(-1, -2) / math.sqrt(keys.size(-1))
    future = torch.ones(T, T, dtype=torch.bool).triu(1)
    logits[..., S + n :] = logits[..., S + n :].masked_fill(future, float("-inf"))
    return logits.softmax(dim=-1)[..., S : S + n].amax(dim=-2)


@pytest.mark.parametrize("B,H,S,n,T", [
    (1, 8, 0, 2000, 2001),  # the first chunk of a long prompt: 7 blocks of 256 queries, then 209
    (2, 3, 4, 500, 513),  # a last block of 257 (never one of a single query)
    (1, 2, 4, 250, 257),  # one block
    (1, 4, 2, 48, 57),  # a later chunk's short reconstruction
    (1, 1, 0, 1, 2),
])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_blocked_scores_are_the_whole_matrix_bit_for_bit(B, H, S, n, T, dtype):
    g = torch.Generator().manual_seed(T)
    queries, sinks, chunk, repeat = ((3 * torch.randn(B, H, m, 64, generator=g)).to(dtype) for m in (T, S, n, T))
    assert torch.equal(reconstruction_attention(queries, sinks, chunk, repeat),
                       former_reconstruction_attention(queries, sinks, chunk, repeat))


@torch.no_grad()
def test_kept_entries_are_those_the_reconstruction_attends_to_most(model):
    """One chunk, no sinks: the score of each prompt entry is the largest weight the model's own (causal)
    attention of the reconstruction [0] + prompt gives it, in an uncompressed forward of prompt + that."""
    L, C = 40, 12
    prompt = random_ids(model, 1, L, seed=3)
    policy = KVzip(max_capacity_prompt=C, n_sink=0)
    cache = model.new_cache(1, policy)
    model(prompt, cache=cache)
    rec = Prefill.record(model, torch.cat([prompt, torch.zeros(1, 1, dtype=torch.long), prompt], dim=1))
    for layer in range(model.config.num_hidden_layers):
        q = rec.queries[layer][:, :, L:]  # the reconstruction's L + 1 queries
        weights = attention_weights(q, rec.keys[layer])  # (1, nh, L + 1, 2L + 1), causal as the model's
        by_hand = weights[..., :L].amax(dim=-2)
        assert torch.allclose(policy.reconstruction_scores[layer], by_hand, atol=1e-6)
        compared, tied = kept_sets_agree(cache.positions(layer), by_hand, C, rel_gap=1e-3)
        assert compared >= 3 and compared + tied == model.config.num_attention_heads


@torch.no_grad()
def test_prompt_within_the_budget_stays_whole_without_a_reconstruction(model):
    for L in (10, 16):
        policy = KVzip(max_capacity_prompt=16)
        cache = model.new_cache(1, policy)
        model(random_ids(model, 1, L, seed=L), cache=cache)
        assert policy.reconstruction_scores == {}  # nothing to evict: prepare ran no forward
        for layer in range(model.config.num_hidden_layers):
            assert torch.equal(cache.positions(layer), torch.arange(L).expand(1, model.config.num_attention_heads, L))


@torch.no_grad()
def test_the_prompt_runs_once_its_prefill_shared_with_the_reconstruction(model):
    """The prefill's forward records the prompt for prepare and fills the cache from that record: two forwards
    for a prompt of one chunk (the prompt, its reconstruction), not three; the same logits as a forward without a
    cache, and the cache a replay of that record leaves."""
    L, C = 48, 16
    prompt = random_ids(model, 2, L, seed=11)
    forwards = []
    hook = model.embed_in.register_forward_hook(lambda module, args, out: forwards.append(args[0].shape))
    try:
        cache = model.new_cache(2, KVzip(max_capacity_prompt=C), record_queries=True)
        logits = model(prompt, cache=cache)
    finally:
        hook.remove()
    assert forwards == [(2, L), (2, L + 1)]  # the prompt, then [separator] + the prompt
    assert torch.equal(logits, model(prompt))
    replayed = Prefill.record(model, prompt, last_only=False).replay(model, KVzip(max_capacity_prompt=C))
    assert cache.seen == L
    for layer in range(model.config.num_hidden_layers):
        assert torch.equal(cache.positions(layer), replayed.positions(layer))
        assert torch.equal(cache.values(layer), replayed.values(layer))
        assert cache.recorded_queries[layer].shape == (2, model.config.num_attention_heads, L,
                                                       model.config.head_size)


@torch.no_grad()
def test_prefill_and_replay_keep_the_same_entries_and_decoding_continues(model):
    L, C, steps = 48, 16, 4
    prompt = random_ids(model, 1, L, seed=9)
    direct = model.new_cache(1, KVzip(max_capacity_prompt=C))
    logits = model(prompt, cache=direct)
    recorded = Prefill.record(model, prompt)
    replayed = recorded.replay(model, KVzip(max_capacity_prompt=C))  # a fresh policy: replay calls prepare
    nh = model.config.num_attention_heads
    for layer in range(model.config.num_hidden_layers):
        assert direct.positions(layer).shape == (1, nh, C)
        assert torch.equal(direct.positions(layer), replayed.positions(layer))
        assert torch.equal(direct.keys(layer), replayed.keys(layer))
    assert torch.allclose(logits[:, -1], recorded.logits[:, -1], atol=1e-5)
    token = logits[:, -1:].argmax(-1)
    for _ in range(steps):
        a, b = model(token, cache=direct), model(token, cache=replayed)
        assert torch.isfinite(a).all() and torch.allclose(a, b, atol=1e-5)
        token = a[:, -1:].argmax(-1)
    for cache in (direct, replayed):
        assert cache.seen == L + steps and cache.length(0) == C + steps
    out = generate(model, prompt[0].tolist(), max_new_tokens=3, compressor=KVzip(max_capacity_prompt=C))
    assert len(out.tokens) == 3 and out.kept_after_prefill == C


@torch.no_grad()
def test_score_without_prepare_for_these_keys_is_a_clear_error(model):
    c = model.config
    k = torch.randn(1, c.num_attention_heads, 30, c.head_size)
    with pytest.raises(ValueError, match="prepare"):
        KVzip(max_capacity_prompt=8).score(0, k, k, k)
    policy = KVzip(max_capacity_prompt=8)
    policy.prepare(model, Prompt(model, random_ids(model, 1, 20, seed=1)))  # another prompt length
    cache = KVCache(c, 1, compressor=policy)
    cache.append(0, k, k)
    with pytest.raises(ValueError, match=r"scores of shape \(1, 4, 20\).*\(1, 4, 30\)"):
        cache.compress(0, k)


def test_kvzip_cannot_compress_during_decoding(model):
    with pytest.raises(ValueError, match="kvzip cannot compress during decoding"):
        model.new_cache(1, KVzip(max_capacity_prompt=8), decode_interval=4)


@torch.no_grad()
def test_sliding_window_eval_replays_prefills_through_prepare(model):
    from eval.ppl import sliding_window_nll

    text = random_ids(model, 1, 160, seed=4)[0]
    full = sliding_window_nll(model, text, 64, 16, NoCompression())
    nll = sliding_window_nll(model, text, 64, 16, KVzip(max_capacity_prompt=16))
    assert nll.shape == full.shape and torch.isfinite(nll).all()
    assert not torch.equal(nll, full)  # the windows' prompts (over 16 tokens) really were compressed


# --- settings and registry -----------------------------------------------------------------------------------

@pytest.mark.parametrize("make,message", [
    (lambda: KVzip(max_capacity_prompt=0), "max_capacity_prompt must be >= 1"),
    (lambda: KVzip(n_sink=-1), "n_sink must be >= 0"),
    (lambda: KVzip(n_sink=9, max_capacity_prompt=8), r"n_sink \(9\) must be <= max_capacity_prompt \(8\)"),
    (lambda: KVzip(chunk_size=0), "chunk_size must be >= 1"),
    (lambda: KVzip(prev_postfix_size=-1), "prev_postfix_size must be >= 0"),
    (lambda: KVzip(separator_id=-1), "separator_id must be a token id >= 0 or None"),
    (lambda: KVzip(separator_id=512).for_model(PythiaConfig(vocab_size=512)), "outside the model's vocabulary"),
    (lambda: build_compressor("kvzip", {"chunk_size": -5}), "chunk_size must be >= 1"),
])
def test_invalid_settings_say_what_is_allowed(make, message):
    with pytest.raises(ValueError, match=message):
        make()


def test_registered_with_its_settings_and_label():
    assert COMPRESSORS["kvzip"] is KVzip
    assert KVzip().label == "kvzip_c512_sink4_chunk2000_carry8_sep0"
    assert KVzip(64, separator_id=None).label == "kvzip_c64_sink4_chunk2000_carry8"
    assert build_compressor("kvzip", {"max_capacity_prompt": 64, "chunk_size": 100}) == KVzip(64, chunk_size=100)
    with pytest.raises(TypeError):
        KVzip(chunk_size=2.5)
