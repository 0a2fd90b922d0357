"""PerLayer: a registered policy per layer (the last name for the deeper layers), each layer compressed as its
policy compresses it alone; the settings it refuses, its label, and decoding."""

import pytest
import torch
from minipythia import COMPRESSORS, H2O, NoCompression, Pythia, PythiaConfig, SnapKV, build_compressor, generate
from minipythia.compressors.per_layer import PerLayer

pytestmark = pytest.mark.usefixtures("single_thread")

C = 40  # > SnapKV's default window (32)


@pytest.fixture(scope="module")
def model(reference_checkpoint):
    return Pythia.from_pretrained(reference_checkpoint("tiny", 0.25, True)[1]).for_inference()


def config(layers: int) -> PythiaConfig:
    return PythiaConfig(vocab_size=8, hidden_size=16, num_hidden_layers=layers, num_attention_heads=2,
                        intermediate_size=8)


def prompt(model, L=70, B=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, model.config.vocab_size, (B, L), generator=g)


def prefilled(model, ids, compressor, **kw):
    cache = model.new_cache(ids.size(0), compressor=compressor, **kw)
    with torch.no_grad():
        model(ids, cache)
    return cache


def test_full_kv_in_layer_0_and_snapkv_after(model):
    ids = prompt(model)
    L = ids.size(1)
    mixed = prefilled(model, ids, PerLayer(layers=("none", "snapkv"), max_capacity_prompt=C))
    full = prefilled(model, ids, NoCompression())
    snap = prefilled(model, ids, SnapKV(max_capacity_prompt=C))
    assert mixed.length(0) == L and mixed.length(1) == C
    assert torch.equal(mixed.positions(0), full.positions(0)) and torch.equal(mixed.keys(0), full.keys(0))
    assert torch.equal(mixed.values(0), full.values(0))
    assert torch.equal(mixed.positions(1), snap.positions(1))
    assert torch.equal(mixed.keys(1), snap.keys(1)) and torch.equal(mixed.values(1), snap.values(1))


def test_decoding_continues(model):
    ids = prompt(model, B=1)
    L = ids.size(1)
    out = generate(model, ids[0].tolist(), max_new_tokens=6, compressor=PerLayer(max_capacity_prompt=C))
    assert len(out.tokens) == 6
    cache = prefilled(model, ids, PerLayer(max_capacity_prompt=C), decode_interval=4)
    with torch.no_grad():
        for t in range(12):
            model(ids[:, t : t + 1], cache)
    assert cache.length(0) == L + 12  # layer 0 never evicts
    assert C <= cache.length(1) <= C + 4
    out = generate(model, ids[0].tolist(), max_new_tokens=6, compressor=PerLayer(max_capacity_prompt=C),
                   decode_interval=2)
    assert len(out.tokens) == 6


def test_sliding_window_nll_runs(model):
    from eval.ppl import sliding_window_nll

    ids = prompt(model, L=120, B=1)[0]
    nll = sliding_window_nll(model, ids, ctx_len=64, stride=16, compressor=PerLayer(max_capacity_prompt=C))
    assert nll.numel() == ids.numel() - 1 and torch.isfinite(nll).all()


def test_fewer_names_the_last_applies_to_the_deeper_layers():
    p = PerLayer(layers=("none", "snapkv"), max_capacity_prompt=C)
    p.for_model(config(4))
    assert [type(x) for x in p.inner] == [NoCompression, SnapKV, SnapKV, SnapKV]
    assert p.inner[1] is p.inner[3]  # each name is built once
    assert p.keep_count(0, 100) == 100 and all(p.keep_count(layer, 100) == C for layer in (1, 2, 3))
    one = PerLayer(layers=("streaming_llm",), max_capacity_prompt=C)
    one.for_model(config(3))
    assert [x.name for x in one.inner] == ["streaming_llm"] * 3 and one.inner[0].max_capacity_prompt == C
    with pytest.raises(ValueError, match="3 policies .* 2 layers"):
        PerLayer(layers=("none", "snapkv", "h2o")).for_model(config(2))
    PerLayer(layers=("none", "snapkv", "h2o")).for_model(config(3))


@pytest.mark.parametrize("layers,message", [
    (("none", "nope"), r"layers\[1\] must be a registered policy, got 'nope'"),
    ((), "at least one policy"),
    (("none", "per_layer"), "cannot nest itself"),
])
def test_refused_settings(layers, message):
    with pytest.raises(ValueError, match=message):
        PerLayer(layers=layers)
    with pytest.raises(ValueError, match=message):
        build_compressor("per_layer", {"layers": list(layers)})


def test_inner_policy_that_cannot_be_built_and_bad_capacity():
    with pytest.raises(ValueError, match="policy snapkv .* cannot be built: window_size"):
        PerLayer(max_capacity_prompt=16)
    with pytest.raises(ValueError, match="max_capacity_prompt must be >= 1"):
        PerLayer(max_capacity_prompt=0)
    with pytest.raises(TypeError):
        PerLayer(layers=(1, 2))


def test_label_and_registry():
    assert COMPRESSORS["per_layer"] is PerLayer
    p = build_compressor("per_layer", {"layers": ["none", "snapkv"]})
    assert p == PerLayer() and p.label == "per_layer_c512_none-snapkv"
    assert PerLayer(layers=("h2o",), max_capacity_prompt=64).label == "per_layer_c64_h2o"
    assert p.settings() == {"max_capacity_prompt": 512, "layers": ["none", "snapkv"]}


def test_decoding_needs_every_policy_to_decode():
    assert PerLayer(layers=("none", "snapkv")).decode_queries() == 32
    mixed = PerLayer(layers=("tova", "h2o"), max_capacity_prompt=C)
    assert mixed.decode_queries() == H2O(max_capacity_prompt=C).n_recent == 20
    assert PerLayer(layers=("none",)).decode_queries() == 0
    with pytest.raises(ValueError, match="per_layer with pyramidkv in layers: pyramidkv cannot compress during"):
        PerLayer(layers=("none", "pyramidkv")).decode_queries()


def test_decode_scores_read_only_the_queries_of_the_layers_policy():
    """During decoding the cache keeps the largest window any layer reads; each policy scores with the newest
    queries it reads itself, as on a cache of its own."""
    g = torch.Generator().manual_seed(0)
    k, v = torch.randn(2, 2, 60, 8, generator=g), torch.randn(2, 2, 60, 8, generator=g)
    p = PerLayer(layers=("snapkv", "h2o"), max_capacity_prompt=C)
    q = torch.randn(2, 2, p.decode_queries(), 8, generator=g)  # the window: SnapKV's 32 > H2O's n_recent
    h2o = H2O(max_capacity_prompt=C)
    assert q.size(2) > h2o.decode_queries()
    assert torch.equal(p.score(1, k, v, q), h2o.score(1, k, v, q[:, :, -h2o.decode_queries():]))
    assert torch.equal(p.score(0, k, v, q), SnapKV(max_capacity_prompt=C).score(0, k, v, q))
    prefill_q = torch.randn(2, 2, 60, 8, generator=g)  # at the prefill every query is passed on
    assert torch.equal(p.score(1, k, v, prefill_q), h2o.score(1, k, v, prefill_q))


def test_prepare_and_missing_input_pass_on():
    p = PerLayer(layers=("none", "oracle"), max_capacity_prompt=C)
    assert "oracle needs" in p.missing_input()
    p.policies["oracle"].future_queries = {0: torch.zeros(1)}
    assert p.missing_input() is None
    assert PerLayer().missing_input() is None


def test_a_none_layer_scores_nothing():
    """The cache never scores a layer that keeps everything; a wrapper using per_layer as its scorer hears why."""
    k = torch.zeros(1, 2, 10, 8)
    with pytest.raises(ValueError, match="layer 0 is 'none', which keeps every entry"):
        PerLayer().score(0, k, k, k)
