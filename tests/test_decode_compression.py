"""Decode-time compression (KVCache decode_interval) and the token-by-token stream PPL (eval/stream.py).

The cache stays within budget + interval while tokens keep coming and drops back to the budget at each
trigger; positions and `seen` stay true; each policy scores with the newest queries, aligned with the
cache's last entries; policies that make no sense during decoding are refused.
"""

import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from conftest import causal_attention, decode_by_hand, snapshot
from eval.__main__ import main as eval_main
from eval.ppl import token_nll
from eval.results import read_jsonl
from eval.stream import segments, stream_nll
from minipythia import (H2O, TOVA, Compressor, KnormPress, KVCache, NoCompression, Oracle, Pythia, PythiaConfig,
                        PyramidKV, RandomEviction, SnapKV, StreamingLLM, generate)
from minipythia.cli import run_cli
from minipythia.compressors import h2o as h2o_module

pytestmark = pytest.mark.usefixtures("single_thread")

ROOT = Path(__file__).resolve().parents[1]

C, INTERVAL = 16, 5
POLICIES = {  # capacity -> policy, for every policy allowed during decoding
    "none": lambda c: NoCompression(),
    "streaming_llm": lambda c: StreamingLLM(n_sink=4, max_capacity_prompt=c),
    "snapkv": lambda c: SnapKV(window_size=4, max_capacity_prompt=c, kernel_size=3),
    "tova": lambda c: TOVA(max_capacity_prompt=c),
    "h2o": lambda c: H2O(max_capacity_prompt=c, recent_ratio=0.5),
    "random": lambda c: RandomEviction(max_capacity_prompt=c, seed=1),
}
EVICTING = [name for name in POLICIES if name != "none"]


@pytest.fixture(scope="module")
def model(reference_checkpoint):
    return Pythia.from_pretrained(reference_checkpoint("tiny", 0.25, True)[1]).for_inference()  # 2 layers, 256 positions


def ids(model, B, T, seed):
    return torch.randint(0, model.config.vocab_size, (B, T), generator=torch.Generator().manual_seed(seed))


# --- the cache during decoding -----------------------------------------------------------------------------

@pytest.mark.parametrize("prompt_len", [10, 40])  # below the budget (kept whole), above it (compressed)
@pytest.mark.parametrize("name", EVICTING)
@torch.no_grad()
def test_cache_stays_within_budget_plus_interval(model, name, prompt_len):
    cache = model.new_cache(2, POLICIES[name](C), decode_interval=INTERVAL)
    logits = model(ids(model, 2, prompt_len, 0), cache=cache)
    assert [cache.length(i) for i in range(cache.num_layers)] == [min(prompt_len, C)] * cache.num_layers
    triggers = 0
    for step in range(60):
        before = [cache.length(i) for i in range(cache.num_layers)]
        logits = model(logits[:, -1:].argmax(-1), cache=cache)
        assert cache.seen == prompt_len + step + 1
        for i, n in enumerate(before):
            if n + 1 > C + INTERVAL:  # the trigger: back to the budget, with the same selection step
                assert cache.length(i) == C
                triggers += 1
            else:
                assert cache.length(i) == n + 1
            positions = cache.positions(i)
            assert (positions.diff(dim=-1) > 0).all() and positions.min() >= 0 and positions.max() < cache.seen
    assert triggers >= 2 * cache.num_layers


@pytest.mark.parametrize("name", EVICTING)
@torch.no_grad()
def test_decode_after_eviction_attends_to_the_kept_entries_at_the_true_position(model, name):
    """Each step equals a decode written out by hand over exactly the entries the cache holds, at rotary
    position `seen`; the entries kept at a trigger are the previous ones plus the new token, at their
    original positions."""
    tokens = ids(model, 2, 50, 1)
    full = model.new_cache(2)  # fed alike: layer 0's K, V do not depend on what was evicted, so they must match
    cache = model.new_cache(2, POLICIES[name](C), decode_interval=INTERVAL)
    for c in (full, cache):
        model(tokens[:, :20], cache=c)
    after_eviction = 0
    for t in range(20, 50):
        token = tokens[:, t : t + 1]
        keys, values, positions = snapshot(cache)
        logits = model(token, cache=cache)
        model(token, cache=full)
        by_hand, new_keys = decode_by_hand(model, token, t, keys, values)
        assert (logits - by_hand).abs().max() <= 1e-5
        assert cache.seen == t + 1
        n_kept = keys[0].size(2)
        if n_kept < t:  # entries were evicted: a cache-length counter would give the wrong position
            wrong, _ = decode_by_hand(model, token, n_kept, keys, values)
            assert (logits - wrong).abs().max() > 1e-3
            after_eviction += 1
        for i in range(cache.num_layers):
            candidates = torch.cat((positions[i], torch.full_like(positions[i][..., :1], t)), dim=-1)  # (B, nh, n + 1)
            candidate_keys = torch.cat((keys[i], new_keys[i]), dim=2)  # (B, nh, n + 1, hs)
            kept = cache.positions(i)
            idx = torch.searchsorted(candidates, kept.contiguous())  # both in position order
            assert torch.equal(candidates.gather(2, idx), kept), "a kept entry that was not in the cache"
            gather = idx.unsqueeze(-1).expand(-1, -1, -1, model.config.head_size)
            assert (cache.keys(i) - candidate_keys.gather(2, gather)).abs().max() <= 1e-5
        full_gather = cache.positions(0).unsqueeze(-1).expand(-1, -1, -1, model.config.head_size)
        assert torch.equal(cache.keys(0), full.keys(0).gather(2, full_gather))
        assert torch.equal(cache.values(0), full.values(0).gather(2, full_gather))
    assert after_eviction >= 10


@pytest.mark.parametrize("interval", [0, 3])
@torch.no_grad()
def test_streaming_llm_keeps_the_sinks_and_the_most_recent_tokens_at_every_step(model, interval):
    n_sink, B = 4, 2
    cache = model.new_cache(B, StreamingLLM(n_sink=n_sink, max_capacity_prompt=C), decode_interval=interval)
    tokens = ids(model, B, 80, 2)
    model(tokens[:, :30], cache=cache)
    for t in range(30, 80):
        model(tokens[:, t : t + 1], cache=cache)
        for i in range(cache.num_layers):
            n = cache.length(i)
            assert C <= n <= C + interval and (interval > 0 or n == C)
            expected = list(range(n_sink)) + list(range(t + 1 - (n - n_sink), t + 1))
            positions = cache.positions(i)
            assert all(p == expected for p in positions.reshape(-1, n).tolist())


@pytest.mark.parametrize("name", list(POLICIES))
@torch.no_grad()
def test_budget_above_the_sequence_changes_nothing(model, name):
    tokens = ids(model, 1, 60, 3)
    plain = model.new_cache(1)
    cache = model.new_cache(1, POLICIES[name](100), decode_interval=0)
    for t in range(60):
        token = tokens[:, t : t + 1]
        assert torch.equal(model(token, cache=cache), model(token, cache=plain))
    assert len(cache) == 60
    out = generate(model, tokens[0, :20].tolist(), max_new_tokens=30, compressor=POLICIES[name](100), decode_interval=0)
    assert out.tokens == generate(model, tokens[0, :20].tolist(), max_new_tokens=30).tokens and out.kept_end == 49


def random_qkv(B, H, T, D, seed):
    g = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(B, H, T, D, generator=g) * 1.5 for _ in range(3))


@pytest.mark.parametrize("name", ["snapkv", "tova", "h2o"])
def test_policies_score_with_the_newest_queries_of_the_last_entries(monkeypatch, name):
    """At each decode-time trigger, score() gets the cache's entries and the queries of its last W
    entries, which are the W newest tokens (W = the policy's decode_queries(): SnapKV's window, 1 for TOVA,
    H2O's recent tokens)."""
    B, H, D = 2, 3, 8
    policy = POLICIES[name](C)
    W = policy.decode_queries()
    assert W == {"snapkv": 4, "tova": 1, "h2o": C // 2}[name]
    config = PythiaConfig(vocab_size=8, hidden_size=H * D, num_hidden_layers=1, num_attention_heads=H,
                          intermediate_size=8)
    cache = KVCache(config, B, compressor=policy, decode_interval=INTERVAL)
    calls = []
    score = policy.score

    def spy(layer, keys, values, queries):
        calls.append((cache.seen, cache.positions(layer).clone(), queries.clone()))
        return score(layer, keys, values, queries)

    monkeypatch.setattr(policy, "score", spy)
    fed = []  # every query fed, in position order
    for step, T in enumerate([10] + [1] * 50):  # a prefill below the budget, then one token at a time
        q, k, v = random_qkv(B, H, T, D, seed=step)
        fed.append(q)
        cache.append(0, k, v)
        cache.after_attention(0, q)
        cache.advance(T)
    fed = torch.cat(fed, dim=2)  # (B, H, 60, D)
    assert len(calls) >= 2
    for seen, positions, queries in calls:
        n = seen + 1  # the trigger runs before advance(): the newest token sits at position `seen`
        assert positions.size(-1) == C + INTERVAL + 1
        assert torch.equal(positions[..., -W:], torch.arange(n - W, n).expand(B, H, W))
        assert torch.equal(queries, fed[:, :, n - W : n])


@pytest.mark.parametrize("chunk", [4, 256])
def test_h2o_with_the_last_queries_sums_only_their_attention(monkeypatch, chunk):
    monkeypatch.setattr(h2o_module, "QUERY_CHUNK", chunk)
    L, Q = 40, 9
    q, k, v = random_qkv(2, 3, L, 16, seed=5)
    h2o = H2O(max_capacity_prompt=16, recent_ratio=0.25)
    scores = h2o.score(0, k, v, q[:, :, -Q:])
    expected = causal_attention(q[:, :, -Q:], k).sum(dim=-2)  # (B, nh, L): each key's attention received
    assert (scores[..., : L - 4] - expected[..., : L - 4]).abs().max() < 1e-5
    assert torch.isinf(scores[..., L - 4 :]).all()


@dataclass
class Recent(Compressor):
    """A policy that does not say which queries it reads during decoding (no decode_queries())."""
    name = "recent"
    budget: int = 8

    def keep_count(self, layer, seq_len):
        return min(seq_len, self.budget)

    def score(self, layer, keys, values, queries):
        return torch.arange(keys.size(2), dtype=torch.float32).expand(keys.shape[:3])


@pytest.mark.parametrize("make,message", [
    (lambda n: Oracle(max_capacity_prompt=16), "oracle cannot compress during decoding: .*queries of the tokens "
                                               "that follow a fixed prompt"),
    (lambda n: PyramidKV(window_size=4, max_capacity_prompt=16, num_layers=n), "pyramidkv cannot compress during "
                                                                               "decoding: .*prompt's length"),
    (lambda n: KnormPress(compression_ratio=0.5), "knorm cannot compress during decoding: .*no fixed budget"),
    (lambda n: Recent(), "recent cannot compress during decoding: .*overrides Compressor.decode_queries"),
])
def test_policies_that_make_no_sense_during_decoding_are_refused(model, make, message):
    policy = make(model.config.num_hidden_layers)
    with pytest.raises(ValueError, match=message):
        model.new_cache(1, policy, decode_interval=4)
    with pytest.raises(ValueError, match=message):
        generate(model, [1, 2, 3], max_new_tokens=2, compressor=policy, decode_interval=4)
    if isinstance(policy, Oracle):
        policy.future_queries = {0: torch.zeros(1, 1, 1, 1)}  # what it needs before it can compress at all
    model.new_cache(1, policy)  # still fine once, at the end of the prefill


def test_bad_decode_intervals_are_refused(model):
    with pytest.raises(ValueError, match="needs a compressor"):
        model.new_cache(1, None, decode_interval=4)
    with pytest.raises(ValueError, match="must be >= 0"):
        model.new_cache(1, TOVA(max_capacity_prompt=16), decode_interval=-1)


@torch.no_grad()
def test_generate_reports_the_bounded_memory(model):
    prompt = ids(model, 1, 40, 4)[0].tolist()
    policy = SnapKV(window_size=4, max_capacity_prompt=C, kernel_size=3)
    once = generate(model, prompt, max_new_tokens=200, compressor=policy)
    during = generate(model, prompt, max_new_tokens=200, compressor=policy, decode_interval=INTERVAL)
    assert once.kept_after_prefill == during.kept_after_prefill == C
    assert once.kept_end == C + 199 and C <= during.kept_end <= C + INTERVAL
    assert during.kv_bytes_end < once.kv_bytes_end / 2
    assert once.tokens[0] == during.tokens[0]  # the first token still comes from the full-KV prefill


# --- the stream PPL ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("n,ctx_len", [(0, 8), (1, 8), (2, 8), (8, 8), (9, 8), (100, 8), (100, 2), (37, 256)])
def test_segments_score_every_token_after_the_first_once(n, ctx_len):
    spans = list(segments(n, ctx_len))
    targets = [t for begin, end in spans for t in range(begin + 1, end)]
    assert targets == list(range(1, n))
    assert all(end - begin <= ctx_len for begin, end in spans)


@torch.no_grad()
def test_stream_without_compressor_equals_one_teacher_forced_forward(model):
    tokens = ids(model, 1, 120, 6)[0]  # shorter than the 256 positions: one segment
    one_forward = token_nll(model(tokens[None, :-1]), tokens[None, 1:])
    for compressor in (None, NoCompression()):
        assert (stream_nll(model, tokens, 256, compressor, decode_interval=8) - one_forward).abs().max() < 1e-5
    # Longer than a segment: each segment is one forward from an empty cache, overlapping by one token.
    tokens = ids(model, 1, 100, 7)[0]
    per_segment = torch.cat([token_nll(model(tokens[None, begin : end - 1]), tokens[None, begin + 1 : end])
                             for begin, end in segments(100, 32)])
    assert (stream_nll(model, tokens, 32) - per_segment).abs().max() < 1e-5


@torch.no_grad()
def test_stream_with_compression_scores_the_same_tokens(model):
    tokens = ids(model, 1, 150, 8)[0]
    reference = stream_nll(model, tokens, 128)
    for name in EVICTING:
        roomy = stream_nll(model, tokens, 128, POLICIES[name](128), decode_interval=0)
        assert torch.equal(roomy, reference), "a budget as large as a segment evicts nothing"
        tight = stream_nll(model, tokens, 128, POLICIES[name](C), decode_interval=INTERVAL)
        assert tight.shape == reference.shape and torch.isfinite(tight).all()
        # Identical up to the forward that triggers the first compression (its attention saw every entry).
        assert torch.equal(tight[: C + INTERVAL + 1], reference[: C + INTERVAL + 1])
        assert not torch.equal(tight, reference)


# --- command lines -----------------------------------------------------------------------------------------

def run_generate_cli(*args) -> subprocess.CompletedProcess:
    # A subprocess, as in test_generate.py: importing minipythia.generate in-process would shadow the
    # package's generate() function with the module of the same name.
    return subprocess.run([sys.executable, "-m", "minipythia.generate", *args], capture_output=True, text=True,
                          cwd=ROOT, timeout=120)


def test_generate_cli_compresses_during_decoding(tiny_checkpoint):
    common = ["--model", str(tiny_checkpoint), "--prompt", "the quick brown fox jumps over a lazy dog. " * 3,
              "--max-new-tokens", "40", "--ignore-eos", "--stats"]
    r = run_generate_cli(*common, "--compressor", "streaming_llm", "--max-capacity-prompt", "8", "--n-sink", "2",
                         "--decode-interval", "4")
    assert r.returncode == 0, r.stderr
    kept = int(re.search(r"\((\d+) entries per head in layer 0\)", r.stderr).group(1))
    assert 8 <= kept <= 12  # without --decode-interval: 8 + 39
    r = run_generate_cli(*common, "--compressor", "knorm", "--decode-interval", "4")
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2 and len(lines) == 1 and "knorm cannot compress during decoding" in lines[0], r.stderr


def test_eval_ppl_stream_mode_writes_records_and_resumes(tiny_checkpoint, tmp_path, capsys):
    words = "the quick brown fox jumps over a lazy dog while seven old men read long books by the sea".split()
    book = tmp_path / "book.txt"
    book.write_text(" ".join(words[i * 7 % len(words)] for i in range(150)))
    out = tmp_path / "out"
    common = ["ppl", "--model", str(tiny_checkpoint), "--data", str(book), "--max-tokens", "100", "--ctx-len", "64",
              "--out", str(out)]
    stream = ["--mode", "stream", "--decode-interval", "4"]
    assert run_cli(eval_main, common + stream) == 0
    assert run_cli(eval_main, common + stream + ["--compressor", "streaming_llm", "--max-capacity-prompt", "16"]) == 0
    windows = [*common[:-1], str(tmp_path / "windows")]  # another setup: another folder
    assert run_cli(eval_main, windows) == 0
    records = [*read_jsonl(out / "none" / "ppl.jsonl"), *read_jsonl(out / "streaming_llm_sink4_c16" / "ppl.jsonl"),
               *read_jsonl(tmp_path / "windows" / "none" / "ppl.jsonl")]
    assert [(r["mode"], r["label"], r.get("decode_interval"), r["stride"]) for r in records] == [
        ("stream", "none", 4, None), ("stream", "streaming_llm_sink4_c16", 4, None), ("window", "none", None, 16)]
    assert [r["tokens"] for r in records] == [99, 99, 99]
    assert records[1]["kept_per_head"] == 16 and records[1]["nll_sum"] != records[0]["nll_sum"]
    capsys.readouterr()
    assert run_cli(eval_main, common + stream) == 0  # a rerun skips what is there
    assert "skipped" in capsys.readouterr().err and len(read_jsonl(out / "none" / "ppl.jsonl")) == 1
    assert run_cli(eval_main, common) == 2  # the window mode refused in the stream's folder
    assert "other settings" in capsys.readouterr().err

    for extra, message in [(["--decode-interval", "4"], "applies to --mode stream"),
                           (["--mode", "stream", "--stride", "8"], "--stride applies to --mode window"),
                           (["--mode", "stream", "--compressor", "tova"], "give --decode-interval"),
                           (stream + ["--compressor", "oracle"], "oracle"),
                           (stream + ["--compressor", "pyramidkv"], "pyramidkv cannot compress during decoding")]:
        assert run_cli(eval_main, common + extra) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and message in err[0], err
