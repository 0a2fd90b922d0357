"""The KV cache: token counter, original positions, rotary position after compression, real memory release."""

import pytest
import torch
from conftest import decode_by_hand, snapshot
from minipythia import KnormPress, NoCompression, Pythia, SnapKV
from minipythia.kv.store import GROWTH

pytestmark = pytest.mark.usefixtures("single_thread")

COMPRESSORS = {
    "knorm": lambda: KnormPress(compression_ratio=0.6),
    "knorm-skip0": lambda: KnormPress(compression_ratio=0.6, skip_layers=(0,)),
    "snapkv": lambda: SnapKV(window_size=4, max_capacity_prompt=12, kernel_size=3),
}


@pytest.fixture(scope="module", params=[True, False], ids=["parallel", "sequential"])
def model(request, reference_checkpoint):
    return Pythia.from_pretrained(reference_checkpoint("tiny", 0.25, request.param)[1]).for_inference()


def prompt(model, batch, length, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, model.config.vocab_size, (batch, length), generator=g)


@torch.no_grad()
def test_hand_written_decode_matches_uncompressed(model):
    """The hand-written step is right: without compression it reproduces the model's full forward."""
    ids = prompt(model, 2, 13)
    cache = model.new_cache(2)
    model(ids[:, :-1], cache=cache)
    keys, values, _ = snapshot(cache)
    by_hand, _ = decode_by_hand(model, ids[:, -1:], 12, keys, values)
    assert (by_hand - model(ids)[:, -1:]).abs().max() <= 1e-5


@pytest.mark.parametrize("compressor", COMPRESSORS)
@torch.no_grad()
def test_decode_after_compression_uses_the_true_position(model, compressor):
    B, L = 2, 30
    ids = prompt(model, B, L + 4, seed=1)
    full = model.new_cache(B)
    model(ids[:, :L], cache=full)
    cache = model.new_cache(B, compressor=COMPRESSORS[compressor]())
    model(ids[:, :L], cache=cache)
    assert cache.seen == L
    evicted = False
    for i in range(cache.num_layers):
        pos = cache.positions(i)
        # The kept entries are the prefill's own (post-rotary) keys and values at their original positions.
        gather = pos.unsqueeze(-1).expand(-1, -1, -1, model.config.head_size)
        assert torch.equal(cache.keys(i), full.keys(i).gather(2, gather))
        assert torch.equal(cache.values(i), full.values(i).gather(2, gather))
        evicted |= cache.length(i) < L
    assert evicted

    for step in range(4):  # each token at position L + step, whatever the number of kept entries
        token = ids[:, L + step : L + step + 1]
        keys, values, positions = snapshot(cache)
        n_kept = [k.size(2) for k in keys]
        logits = model(token, cache=cache)
        by_hand, new_keys = decode_by_hand(model, token, L + step, keys, values)
        assert (logits - by_hand).abs().max() <= 1e-5
        assert cache.seen == L + step + 1
        for i in range(cache.num_layers):
            assert cache.length(i) == n_kept[i] + 1
            assert torch.equal(cache.positions(i)[..., :-1], positions[i])
            assert (cache.positions(i)[..., -1] == L + step).all()
            assert (cache.keys(i)[:, :, -1:] - new_keys[i]).abs().max() <= 1e-5
        # The wrong position (number of kept entries, as a cache-length counter would give) differs.
        wrong, _ = decode_by_hand(model, token, n_kept[-1], keys, values)
        assert (logits - wrong).abs().max() > 1e-3


@torch.no_grad()
def test_seen_and_positions_without_compression(model):
    B = 3
    cache = model.new_cache(B)
    assert cache.seen == 0 and len(cache) == 0
    ids = prompt(model, B, 20, seed=2)
    for start, end in [(0, 9), (9, 10), (10, 16), (16, 17), (17, 20)]:
        model(ids[:, start:end], cache=cache)
        assert cache.seen == end and len(cache) == end
        for i in range(cache.num_layers):
            pos = cache.positions(i)
            assert pos.dtype == torch.long and pos.shape == (B, model.config.num_attention_heads, end)
            assert torch.equal(pos, torch.arange(end).expand_as(pos))
            assert cache.keys(i).shape == cache.values(i).shape == (B, model.config.num_attention_heads, end,
                                                                      model.config.head_size)


@pytest.mark.parametrize("compressor", COMPRESSORS)
@torch.no_grad()
def test_positions_after_compression(model, compressor):
    B, L = 2, 30
    comp = COMPRESSORS[compressor]()
    cache = model.new_cache(B, compressor=comp)
    model(prompt(model, B, L, seed=3), cache=cache)
    H = model.config.num_attention_heads
    for i in range(cache.num_layers):
        pos = cache.positions(i)
        keep = comp.keep_count(i, L)
        assert pos.dtype == torch.long and pos.shape == (B, H, keep) and cache.length(i) == keep
        assert (pos.diff(dim=-1) > 0).all()  # distinct, in position order
        assert pos.min() >= 0 and pos.max() < L
    assert len(cache) == cache.length(0)


def entry_bytes(model, dtype):
    """Bytes per cached entry per head: a key and a value (head_size each) and an int64 position."""
    return 2 * model.config.head_size * torch.tensor([], dtype=dtype).element_size() + 8


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("compressor", COMPRESSORS)
@torch.no_grad()
def test_compression_frees_memory(reference_checkpoint, compressor, dtype):
    model = Pythia.from_pretrained(reference_checkpoint("tiny")[1], dtype=dtype).for_inference()
    B, L, H = 2, 40, model.config.num_attention_heads
    comp = COMPRESSORS[compressor]()
    cache = model.new_cache(B, compressor=comp)
    assert cache.nbytes == 0 and cache.nbytes_before_compression is None
    model(prompt(model, B, L, seed=4), cache=cache)
    per_entry = entry_bytes(model, dtype)
    n_layers = model.config.num_hidden_layers
    keeps = [comp.keep_count(i, L) for i in range(n_layers)]
    assert any(k < L for k in keeps)
    assert cache.nbytes_before_compression == n_layers * B * H * L * per_entry
    assert cache.nbytes == sum(B * H * k * per_entry for k in keeps)
    for i, k in enumerate(keeps):
        # The tensors themselves are sized to the kept entries: the evicted ones are not merely masked.
        key_bytes = B * H * k * model.config.head_size * torch.tensor([], dtype=dtype).element_size()
        assert cache.keys(i).untyped_storage().nbytes() == key_bytes
        assert cache.values(i).untyped_storage().nbytes() == key_bytes
        assert cache.positions(i).untyped_storage().nbytes() == B * H * k * 8

    # Decoding grows the buffers in chunks, not one reallocation per token.
    model(prompt(model, B, 1, seed=5), cache=cache)
    grown = cache.nbytes
    assert grown == sum(B * H * (k + 1 + GROWTH) * per_entry for k in keeps)
    for step in range(3):
        model(prompt(model, B, 1, seed=6 + step), cache=cache)
    assert cache.nbytes == grown and cache.seen == L + 4


@torch.no_grad()
def test_nbytes_without_compression(model):
    B, L = 2, 17
    cache = model.new_cache(B, compressor=NoCompression())
    model(prompt(model, B, L), cache=cache)
    c = model.config
    expected = c.num_hidden_layers * B * c.num_attention_heads * L * entry_bytes(model, torch.float32)
    assert cache.nbytes == cache.nbytes_before_compression == expected
    assert len(cache) == L


@pytest.mark.parametrize("cache_batch,input_batch", [(1, 2), (3, 1)])
def test_batch_mismatch_raises(model, cache_batch, input_batch):
    cache = model.new_cache(cache_batch)
    with pytest.raises(ValueError, match=f"batch size {cache_batch}.*{input_batch}"):
        model(prompt(model, input_batch, 5), cache=cache)
    assert cache.seen == 0
