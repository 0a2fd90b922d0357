"""Quantized KV storage (KIVI): bit packing, per-channel keys and per-token values, the full-precision tails,
decoding over the dequantized cache equal to attention computed by hand, composition with eviction, and
the bytes really held."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from minipythia import NoCompression, Pythia, SnapKV, StreamingLLM
from minipythia.kv.quantization import pack, quantize, unpack
from minipythia.kv import QuantizedStore
from minipythia.weights import EMBEDDED_MODEL

from conftest import decode_by_hand, tiny_sweep


@settings(max_examples=40, deadline=None)
@given(bits=st.sampled_from([2, 4, 8]), width=st.integers(1, 6), seed=st.integers(0, 10_000))
def test_pack_then_unpack_gives_the_codes_back(bits, width, seed):
    codes = torch.randint(0, 2**bits, (2, 3, 5, width * 8), dtype=torch.uint8,
                          generator=torch.Generator().manual_seed(seed))
    packed = pack(codes, bits)
    assert packed.dtype == torch.uint8 and packed.shape[-1] == width * bits  # 8 / bits codes to a byte
    assert torch.equal(unpack(packed, bits), codes)


def fake_quantize_by_hand(x: torch.Tensor, bits: int, group: int, along_tokens: bool) -> torch.Tensor:
    """KIVI's asymmetric min-max quantization, written out group by group: minimum and scale in float16."""
    out = torch.empty_like(x, dtype=torch.float32)
    B, H, n, D = x.shape
    for b in range(B):
        for h in range(H):
            for i in range(0, n if along_tokens else n, group if along_tokens else 1):
                for j in range(0, D, 1 if along_tokens else group):
                    block = (slice(i, i + group), slice(j, j + 1)) if along_tokens else \
                        (slice(i, i + 1), slice(j, j + group))
                    g = x[b, h][block].float()
                    low = g.min().half().float()
                    scale = ((g.max() - g.min()) / (2**bits - 1)).half().float()
                    codes = ((g - low) / scale).round().clamp(0, 2**bits - 1) if scale > 0 else torch.zeros_like(g)
                    out[b, h][block] = codes * scale + low
    return out


@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize("along_tokens", [True, False])
def test_quantize_is_per_group_min_max(bits, along_tokens):
    x = torch.randn(2, 2, 16, 8, generator=torch.Generator().manual_seed(bits)) * 3
    x[0, 0, :, 3] += 40  # an outlier channel: per-channel key groups keep it to its own channel
    q = quantize(x, bits, 4, along_tokens)
    got = q.dequantize(torch.float32)
    torch.testing.assert_close(got, fake_quantize_by_hand(x, bits, 4, along_tokens), rtol=0, atol=1e-5)
    assert q.minimum.dtype == torch.float16 and q.codes.numel() == x.numel() * bits // 8
    assert q.minimum.shape == ((2, 2, 4, 8) if along_tokens else (2, 2, 16, 2))
    # the error of each entry is about half its group's step: the rounding of its code, plus the float16
    # rounding of the minimum and of the scale (times up to 2^bits - 1 steps)
    steps = q.scale.float().repeat_interleave(4, dim=2) if along_tokens else q.scale.float().repeat_interleave(4, -1)
    assert bool(((got - x).abs() <= steps * (0.5 + 2**bits / 2**11) + x.abs() / 2**11 + 1e-5).all())


@pytest.fixture(scope="module")
def model():
    return Pythia.from_pretrained(EMBEDDED_MODEL).for_inference()


def prompt(n: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 8000, (1, n), generator=torch.Generator().manual_seed(seed))


def test_kivi_keeps_the_newest_entries_in_full_precision_and_flushes_as_it_decodes(model):
    n, R = 300, 128
    cache = model.new_cache(kv_bits=4, kv_group_size=32, kv_residual=R)
    logits = model(prompt(n), cache=cache)
    store = cache.stores[0]
    assert isinstance(store, QuantizedStore)
    assert store._keys.num_tokens == n - n % R == 256 and store._key_tail_len == n % R == 44
    assert store._values.num_tokens == n - R and store._value_tail_len == R
    for step in range(R - n % R):  # the key tail fills up to R, then is quantized whole
        logits = model(logits[:, -1:].argmax(-1), cache=cache)
    assert store._keys.num_tokens == 384 and store._key_tail_len == 0
    assert store._values.num_tokens == 384 - R and store._value_tail_len == R
    assert torch.equal(cache.positions(0)[0, 0], torch.arange(n + R - n % R))
    assert len(cache) == cache.seen == 384


@pytest.mark.parametrize("bits", [2, 4])
def test_decoding_attends_to_exactly_the_dequantized_entries(model, bits):
    """A prefill into a quantized cache, then decode steps: each step's logits equal one decode step written
    out from the weights over the entries quantized and dequantized by hand (and the full-precision tails)."""
    n, R, G = 200, 64, 16
    ids = prompt(n, seed=bits)
    full = model.new_cache()
    model(ids, cache=full)
    cache = model.new_cache(kv_bits=bits, kv_group_size=G, kv_residual=R)
    token = model(ids, cache=cache)[:, -1:].argmax(-1)
    hs = model.config.head_size
    value_group = G if hs % G == 0 else hs
    n_keys = n - n % R
    kept_keys = [torch.cat((fake_quantize_by_hand(full.keys(i)[:, :, :n_keys], bits, G, True),
                            full.keys(i)[:, :, n_keys:]), dim=2) for i in range(full.num_layers)]
    exact_values = [full.values(i) for i in range(full.num_layers)]  # every value in full precision

    def kept_values():  # all but the newest R quantized, each token on its own
        return [torch.cat((fake_quantize_by_hand(v[:, :, : v.size(2) - R], bits, value_group, False),
                           v[:, :, v.size(2) - R :]), dim=2) for v in exact_values]

    for step in range(3):
        by_hand, _ = decode_by_hand(model, token, n + step, kept_keys, kept_values())
        ours = model(token, cache=cache)
        torch.testing.assert_close(ours, by_hand, rtol=0, atol=1e-4)
        # the new entries join the full-precision tails (the key tail does not reach R in these steps)
        kept_keys = [torch.cat((k, cache.keys(i)[:, :, -1:]), dim=2) for i, k in enumerate(kept_keys)]
        exact_values = [torch.cat((v, cache.values(i)[:, :, -1:]), dim=2) for i, v in enumerate(exact_values)]
        token = ours[:, -1:].argmax(-1)
    # and it is not the full-precision result: the quantization changed something
    assert not torch.allclose(cache.keys(0)[:, :, :n_keys], full.keys(0)[:, :, :n_keys])


def test_quantization_composes_with_eviction(model):
    ids = prompt(600)
    plain, quantized = model.new_cache(compressor=SnapKV(max_capacity_prompt=256)), \
        model.new_cache(compressor=SnapKV(max_capacity_prompt=256, kv_bits=4))
    model(ids, cache=plain), model(ids, cache=quantized)
    for layer in range(plain.num_layers):  # the same entries kept (selected in full precision), then quantized
        assert torch.equal(plain.positions(layer), quantized.positions(layer))
        assert quantized.keys(layer).shape == plain.keys(layer).shape
    assert quantized.nbytes < 0.4 * plain.nbytes  # (of the 256 kept, the newest 128 values stay in float32)
    assert quantized.compressor.label == "snapkv_w32_c256_k5_avgpool_kv4_g32_res128"


@pytest.mark.parametrize("bits, at_most", [(4, 0.35), (2, 0.25)])
def test_a_768_token_prompt_really_takes_a_fraction_of_the_bytes(model, bits, at_most):
    ids = prompt(768)
    full, quantized = model.new_cache(), model.new_cache(kv_bits=bits)
    model(ids, cache=full), model(ids, cache=quantized)
    assert quantized.nbytes <= at_most * full.nbytes
    # what it holds is codes, float16 minima and scales, the tails and positions: nothing full-size besides
    assert all(isinstance(store, QuantizedStore) for store in quantized.stores)


def test_settings_that_cannot_apply_are_errors(model):
    with pytest.raises(ValueError, match="give kv_bits"):
        SnapKV(kv_group_size=16)
    with pytest.raises(ValueError, match="multiple of kv_group_size"):
        NoCompression(kv_bits=4, kv_group_size=32, kv_residual=48)
    with pytest.raises(ValueError, match="one of 2, 4, 8"):
        NoCompression(kv_bits=3)
    # new_cache's storage arguments are the compressor's storage settings
    assert model.new_cache(compressor=SnapKV(), kv_bits=2).compressor == SnapKV(kv_bits=2)
    assert NoCompression().settings() == {} and NoCompression(kv_bits=4).label == "none_kv4_g32_res128"


def test_budget_plots_measure_in_bytes_when_some_configuration_is_quantized():
    from eval.budget import budget_axis

    plain = [dict(label="none", settings={}, kept=768, kv_bytes=4_000_000),
             dict(label="snap", settings={"max_capacity_prompt": 256}, kept=256, kv_bytes=1_000_000)]
    quantized = plain + [dict(label="kv4", settings={"kv_bits": 4}, kept=768, kv_bytes=1_100_000)]
    assert budget_axis(plain) == ("kept KV entries per head", {"none": 768, "snap": 256})
    label, x = budget_axis(quantized)
    assert label.startswith("KV bytes") and x["kv4"] == pytest.approx(1_100_000 / 2**20)
    assert budget_axis(plain, "bytes")[1]["snap"] == pytest.approx(1_000_000 / 2**20)
    assert budget_axis(quantized, "entries")[1]["kv4"] == 768
    assert budget_axis([dict(label="old", settings={}, kept=None)]) is None  # folders that predate the field
    with pytest.raises(ValueError, match="one of auto, entries, bytes"):
        budget_axis(plain, "tokens")


def test_a_sweep_takes_kv_bits_as_an_axis_and_records_the_bytes_held(tiny_checkpoint, tmp_path):
    import json

    from eval.results import read_jsonl

    out = tiny_sweep(tiny_checkpoint, tmp_path, "  - {compressor: none, kv_bits: [null, 4]}\n"
                                                # 64-token window prompts: quantized beyond 32
                                                "  - {compressor: none, kv_bits: 4, kv_residual: 32}\n")
    plain, quantized = (json.loads((out / label / "config.json").read_text())
                        for label in ("none", "none_kv4_g32_res32"))
    assert quantized["settings"]["kv_bits"] == 4 and quantized["kv_bytes"] < 0.6 * plain["kv_bytes"]
    # (with the default residual of 128, a 64-token prompt stays in full precision: the same bytes as none)
    assert json.loads((out / "none_kv4_g32_res128" / "config.json").read_text())["kv_bytes"] == plain["kv_bytes"]
    (a,), (b,) = read_jsonl(out / "none" / "ppl.jsonl"), read_jsonl(out / "none_kv4_g32_res32" / "ppl.jsonl")
    assert a["tokens"] == b["tokens"] and a["nll_sum"] != b["nll_sum"]  # scored on its own, not taken for none's
    assert "KV MiB held" in (out / "report.md").read_text()
