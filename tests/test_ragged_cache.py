"""The cache of head-wise policies (headwise): each head holds only the entries it kept, packed; decoding
over it equals attention computed by hand over exactly those entries at their true positions. (AdaKV's own
selection is tested in test_adakv.py; here a policy of the test's own, whose heads keep 1 to 7 eighths.)"""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch

from minipythia import NoCompression, Pythia, SnapKV
from minipythia.kv import RaggedStore
from minipythia.weights import EMBEDDED_MODEL

from conftest import check_decoding_by_hand, tiny_sweep


@dataclass
class Unequal(SnapKV):
    """SnapKV's scores; head h keeps its top (2h + 1) / nh of the average budget, so heads differ."""
    name = "unequal"  # not registered: a test's policy
    headwise = True

    def select(self, layer, scores, keep):
        B, H, L = scores.shape
        mask = torch.zeros_like(scores, dtype=torch.bool)
        for h in range(H):
            n = min(L, max(1, keep * (2 * h + 1) // H))
            mask[:, h].scatter_(-1, scores[:, h].topk(n, dim=-1).indices, True)
        return mask


@pytest.fixture(scope="module")
def model():
    return Pythia.from_pretrained(EMBEDDED_MODEL).for_inference()


def test_decoding_attends_to_each_heads_own_entries(model):
    L, C = 400, 128
    ids = torch.randint(0, 8000, (2, L), generator=torch.Generator().manual_seed(0))
    policy = Unequal(max_capacity_prompt=C)
    cache, full = model.new_cache(2, compressor=policy), model.new_cache(2)
    token = model(ids, cache=cache)[:, -1:].argmax(-1)
    assert all(isinstance(store, RaggedStore) for store in cache.stores)
    queries = {}
    prefill_cache = model.new_cache(2, record_queries=True)
    model(ids, cache=prefill_cache)
    keys, values, valid = [], [], []
    for layer in range(model.config.num_hidden_layers):
        k, v, q = prefill_cache.keys(layer), prefill_cache.values(layer), prefill_cache.recorded_queries[layer]
        mask = policy.select(layer, policy.score(layer, k, v, q), C)  # what each head keeps, by hand
        counts = mask.sum(-1)
        assert torch.equal(cache.lengths(layer), counts) and len(set(counts[0].tolist())) > 1
        # the cache's positions: each head's kept ones in order, then -1
        for b in range(2):
            for h in range(model.config.num_attention_heads):
                kept = mask[b, h].nonzero()[:, 0]
                row = cache.positions(layer)[b, h]
                assert torch.equal(row[: kept.numel()], kept) and bool((row[kept.numel():] == -1).all())
        keys.append(k), values.append(v), valid.append(mask)
    valid = check_decoding_by_hand(model, cache, token, L, keys, values, valid)  # each head's entries
    assert torch.equal(cache.lengths(0), valid[0][..., :L].sum(-1) + 3)


def test_it_holds_the_kept_entries_only(model):
    ids = torch.randint(0, 8000, (1, 768), generator=torch.Generator().manual_seed(1))
    ragged, uniform = model.new_cache(compressor=Unequal(max_capacity_prompt=256)), \
        model.new_cache(compressor=SnapKV(max_capacity_prompt=256))
    model(ids, cache=ragged), model(ids, cache=uniform)
    kept = sum(int(ragged.lengths(i).sum()) for i in range(ragged.num_layers))
    hs = model.config.head_size
    entry = 2 * hs * 4 + 8  # K and V in float32, and its position
    assert kept * entry <= ragged.nbytes <= kept * entry + 1024  # plus the counts per head
    # the same number of entries as SnapKV at C = 256 (the heads share 4 x 256 between them): the same bytes
    assert abs(ragged.nbytes - uniform.nbytes) <= 0.15 * uniform.nbytes


def test_it_cannot_compress_during_decoding(model):
    with pytest.raises(ValueError, match="cannot compress during decoding"):
        model.new_cache(compressor=Unequal(), decode_interval=8)
    assert model.new_cache(compressor=NoCompression()).key_padding(0) is None


def test_a_forward_of_many_tokens_equals_decoding_them_one_by_one(model):
    """The targets of a PPL window are teacher-forced in one forward: causal among themselves, padded
    heads masked; the same logits as decoding them one at a time."""
    ids = torch.randint(0, 8000, (1, 300), generator=torch.Generator().manual_seed(2))
    prompt, targets = ids[:, :240], ids[:, 240:]
    at_once, one_by_one = (model.new_cache(compressor=Unequal(max_capacity_prompt=96)) for _ in range(2))
    model(prompt, cache=at_once), model(prompt, cache=one_by_one)
    together = model(targets, cache=at_once)
    stepped = torch.cat([model(targets[:, i : i + 1], cache=one_by_one) for i in range(targets.size(1))], dim=1)
    torch.testing.assert_close(together, stepped, rtol=0, atol=1e-4)
    from eval.ppl import sliding_window_nll

    nll = sliding_window_nll(model, ids[0], 128, 32, Unequal(max_capacity_prompt=48))
    assert bool(torch.isfinite(nll).all()) and not torch.equal(nll, sliding_window_nll(model, ids[0], 128, 32))


def test_adakv_on_a_768_token_prompt_keeps_different_counts_in_snapkvs_bytes(model):
    """Issue 15's bar: AdaKV(max_capacity_prompt=256) keeps a different number of entries per head, and holds
    within 15% of SnapKV's bytes at C = 256 (the same entries in all), really freed."""
    from minipythia.compressors.adakv import AdaKV

    ids = torch.randint(0, 8000, (1, 768), generator=torch.Generator().manual_seed(3))
    ada, snap = model.new_cache(compressor=AdaKV(max_capacity_prompt=256)), \
        model.new_cache(compressor=SnapKV(max_capacity_prompt=256))
    model(ids, cache=ada), model(ids, cache=snap)
    for layer in range(ada.num_layers):
        counts = ada.lengths(layer)
        assert int(counts.sum()) == 4 * 256 and len(set(counts[0].tolist())) > 1
        assert int(counts.min()) >= int(256 * 0.2)  # the safeguard
    assert abs(ada.nbytes - snap.nbytes) <= 0.15 * snap.nbytes


def test_a_sweep_reports_each_heads_budget_and_the_bytes_a_masking_cache_would_hold(tiny_checkpoint, tmp_path):
    import json

    from eval.results import read_jsonl

    out = tiny_sweep(tiny_checkpoint, tmp_path, "  - {compressor: none}\n"
                                                "  - {compressor: adakv, max_capacity_prompt: 40, scorer: knorm}\n")
    (record,) = read_jsonl(out / "adakv_c40_knorm_a0.2" / "ppl.jsonl")
    heads = record["kept_by_head"]  # (layers, heads): every window keeps 4 x 40 entries per layer
    assert len(heads) == 2 and all(sum(row) == pytest.approx(4 * 40, abs=0.05) for row in heads)
    config = json.loads((out / "adakv_c40_knorm_a0.2" / "config.json").read_text())
    assert config["kv_bytes"] < 0.75 * config["kv_bytes_masked"]  # 40 of 64 entries, really freed
    report = (out / "report.md").read_text()
    assert "## Head-wise budgets" in report and (out / "plots" / "head_budgets.png").is_file()
