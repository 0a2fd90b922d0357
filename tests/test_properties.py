"""Property-based tests of the validators: whatever a user types, a command either runs or says in one line
what is wrong (exit code 2), and the library raises ValueError / TypeError, never anything deeper. And of the
policies: whatever keys, values and queries a prompt leaves (constant and zero channels, zero vectors, repeated
rows), no policy hands NaN scores to the selection."""

import re
from types import SimpleNamespace

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from eval.grid import ConfigError, parse_spec
from minipythia import COMPRESSORS, KVCache, Prompt, PythiaConfig, build_compressor
from minipythia.cli import run_cli
from minipythia.compressors.kvzip import reconstruction_attention
from minipythia.compressors.settings import settings_of
from minipythia.generate.__main__ import main as generate_main

# Values of every kind a flag or a YAML field may be given: numbers in and out of range, text, nothing.
ANY_TEXT = st.one_of(st.integers(-5, 600).map(str), st.floats(-2, 3).map(str),
                     st.sampled_from(["", "x", "none", "true", "0,1", "1,-1", "avgpool", "maxpool", "nan", "inf"]))
ANY_VALUE = st.one_of(st.none(), st.booleans(), st.integers(-5, 600), st.floats(allow_nan=True), st.text(max_size=5),
                      st.lists(st.integers(-2, 8), max_size=3), st.dictionaries(st.text(max_size=3), st.integers(),
                                                                                   max_size=2))
FLAGS = ["--temperature", "--top-k", "--top-p", "--seed", "--max-capacity-prompt",
         "--window-size", "--kernel-size", "--pooling", "--compression-ratio", "--skip-layers", "--n-sink",
         "--recent-ratio", "--compressor-seed", "--beta", "--num-layers", "--decode-interval", "--dtype"]
SLOW = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


@SLOW
@given(compressor=st.sampled_from(sorted(COMPRESSORS)),
       flags=st.lists(st.tuples(st.sampled_from(FLAGS), ANY_TEXT), max_size=4, unique_by=lambda f: f[0]),
       new_tokens=st.one_of(st.integers(-2, 6).map(str), st.sampled_from(["x", "1.5", ""])))  # small: quick examples
def test_generate_runs_or_says_what_is_wrong_in_one_line(tiny_checkpoint, capsys, compressor, flags, new_tokens):
    argv = ["--model", str(tiny_checkpoint), "--prompt", "the quick brown fox jumps", "--compressor", compressor,
            "--max-new-tokens", new_tokens] + [x for flag, value in flags for x in (flag, value)]
    try:
        code = run_cli(generate_main, argv)
    except SystemExit as e:  # argparse's own refusals (a non-number for an int option): usage + one error line
        code = e.code
    err = capsys.readouterr().err
    assert code in (0, 2), err
    assert "Traceback" not in err
    if code == 2:
        assert len([line for line in err.splitlines() if "error:" in line]) == 1, err


@settings(max_examples=300, deadline=None)
@given(name=st.sampled_from(sorted(COMPRESSORS)), data=st.data())
def test_any_settings_build_a_compressor_or_raise_a_clear_error(name, data):
    fields = [s.name for s in settings_of(COMPRESSORS[name])] + ["not_a_setting"]
    chosen = data.draw(st.dictionaries(st.sampled_from(fields), ANY_VALUE, max_size=3))
    try:
        compressor = build_compressor(name, chosen)
    except (TypeError, ValueError) as e:
        assert str(e) and "\n" not in str(e)
        return
    assert compressor.label.startswith(name)


TOP = ["model", "revision", "dtype", "data", "books", "tokenizer", "ctx_len", "stride", "max_tokens", "mode",
       "decode_interval", "ppl", "batch_size", "batch_windows", "speed", "policies", "bogus"]


@settings(max_examples=300, deadline=None)
@given(raw=st.dictionaries(st.sampled_from(TOP), ANY_VALUE, max_size=5),
       policies=st.lists(st.dictionaries(st.sampled_from(["compressor", "max_capacity_prompt", "window_size",
                                                          "pooling", "skip_layers", "oops"]),
                                         st.one_of(ANY_VALUE, st.sampled_from(sorted(COMPRESSORS))), max_size=3),
                         max_size=2))
def test_any_sweep_file_parses_or_is_one_config_error(tmp_path_factory, raw, policies):
    import yaml

    raw = dict(raw, policies=raw.get("policies", policies))
    text = yaml.safe_dump(raw)
    path = tmp_path_factory.getbasetemp() / "prop.yaml"
    try:
        spec = parse_spec(text, path)
    except ConfigError as e:
        assert str(e).startswith(str(path)) and "\n" not in str(e)
        return
    assert spec.policies


PPL_FLAGS = ["--ctx-len", "--stride", "--max-tokens", "--books", "--mode", "--decode-interval", "--max-capacity-prompt",
             "--window-size", "--n-sink", "--compression-ratio", "--dtype"]


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(compressor=st.sampled_from(sorted(COMPRESSORS)),
       flags=st.lists(st.tuples(st.sampled_from(PPL_FLAGS), st.one_of(ANY_TEXT, st.sampled_from(["stream", "window"]))),
                      max_size=4, unique_by=lambda f: f[0]))
def test_eval_ppl_runs_or_says_what_is_wrong_in_one_line(tiny_checkpoint, tmp_path_factory, capsys, compressor, flags):
    from eval.__main__ import main as eval_main

    root = tmp_path_factory.mktemp("prop-ppl")
    (root / "book.txt").write_text("the quick brown fox jumps over a lazy dog " * 12)
    argv = ["ppl", "--model", str(tiny_checkpoint), "--data", str(root / "book.txt"), "--compressor", compressor,
            "--out", str(root / "out")] + [x for flag, value in flags for x in (flag, value)]
    if "--max-tokens" not in argv:
        argv += ["--max-tokens", "64"]  # a short run: the flag itself is drawn too when it is in `flags`
    try:
        code = run_cli(eval_main, argv)
    except SystemExit as e:
        code = e.code
    err = capsys.readouterr().err
    assert code in (0, 2), err
    assert "Traceback" not in err
    if code == 2:
        assert len(re.findall(r"error: ", err)) == 1, err


# --- no policy hands NaN scores to the selection -------------------------------------------------------------

# Settings that make every policy compress a prompt of 48-80 tokens; the rest are its defaults.
# DuoAttention ranks per layer here: ranked over the model, the same head scores need the model's prefill.
SMALL_SETTINGS = {"lagkv": {"lag_size": 8, "n_sink": 2},
                  "duo_attention": {"sink_size": 4, "recent_size": 8, "pattern_length": 16, "head_ranking": "layer"},
                  "merging": {"merge_budget": 4}, "expected_attention": {"n_future_positions": 16}}
CAPACITY = 40


def degenerate_tensors(data, B, H, L, hs):
    """Random queries, keys, values (B, nh, L, hs) spoiled the ways real caches are: channels constant or zero
    over the whole prompt or a stretch of it (tiny-pg19 has dead key channels), zero vectors, repeated rows."""
    g = torch.Generator().manual_seed(data.draw(st.integers(0, 2**16), label="seed"))
    q, k, v = (torch.randn(B, H, L, hs, generator=g) for _ in range(3))
    for x in (q, k, v):
        for _ in range(data.draw(st.integers(0, 4))):
            kind = data.draw(st.sampled_from(["channel", "stretch", "zero_rows", "repeat", "all_zero"]))
            h, c = data.draw(st.integers(0, H - 1)), data.draw(st.integers(0, hs - 1))
            start = data.draw(st.integers(0, L - 2))
            end = data.draw(st.integers(start + 1, L))
            value = data.draw(st.sampled_from([0.0, 1.0, -2.5]))
            if kind == "channel":
                x[:, h, :, c] = value
            elif kind == "stretch":
                x[:, h, start:end, c] = value
            elif kind == "zero_rows":
                x[:, h, start:end] = 0.0
            elif kind == "repeat":
                x[:, h, start:end] = x[:, h, start : start + 1]
            else:
                x.zero_()
    return q, k, v


def fake_model(config, data):
    """What prepare() reads of a model besides a forward (CriticalKV's output projections), some columns zero."""
    w = torch.randn(config.hidden_size, config.hidden_size) / config.hidden_size ** 0.5
    if data.draw(st.booleans(), label="dead output columns"):
        w[:, : config.head_size] = 0.0
    return SimpleNamespace(layers=[SimpleNamespace(attention=SimpleNamespace(dense=SimpleNamespace(weight=w)))
                                   for _ in range(config.num_hidden_layers)])


@pytest.mark.parametrize("name", sorted(COMPRESSORS))
@settings(max_examples=30, deadline=None)
@given(data=st.data())
def test_no_policy_hands_nan_scores_to_the_selection(name, data):
    B, H, hs = data.draw(st.integers(1, 2)), data.draw(st.integers(1, 3)), data.draw(st.sampled_from([8, 16]))
    L = data.draw(st.integers(48, 80))
    config = PythiaConfig(vocab_size=8, hidden_size=H * hs, num_hidden_layers=2, num_attention_heads=H,
                          intermediate_size=8, max_position_embeddings=128)
    cls = COMPRESSORS[name]
    own = {s.name for s in settings_of(cls)}
    policy = build_compressor(name, {**({"max_capacity_prompt": CAPACITY} if "max_capacity_prompt" in own else {}),
                                     **SMALL_SETTINGS.get(name, {})})
    policy.for_model(config)
    q, k, v = degenerate_tensors(data, B, H, L, hs)
    layers = range(config.num_hidden_layers)  # the same tensors in each: per_layer's second policy, pyramidkv's
    if name == "oracle":
        policy.future_queries = dict.fromkeys(layers, degenerate_tensors(data, B, H, 8, hs)[0])
    if name == "kvzip":  # its scores come from a reconstruction forward (prepare): its attention, on these keys
        scores = reconstruction_attention(q[:, :, -16:], k[:, :, :4], k[:, :, 4:], k[:, :, -16:])
        policy.reconstruction_scores = dict.fromkeys(
            layers, torch.cat((torch.full((B, H, 4), float("inf")), scores), dim=-1))
    else:
        model = fake_model(config, data)
        policy.prepare(model, Prompt(model, torch.zeros(B, L, dtype=torch.long)))

    handed = []
    score = policy.score
    policy.score = lambda *args: handed.append(score(*args)) or handed[-1]  # what the selection receives
    cache = KVCache(config, B, compressor=policy)
    for layer in layers:
        cache.append(layer, k, v)
        cache.after_attention(layer, q)
    cache.advance(L)
    for scores in handed:
        assert scores.shape == (B, H, L) and not scores.isnan().any(), f"{name} scored NaN"
    assert len(handed) == sum(policy.keep_count(layer, L) < L for layer in layers)
    for layer in layers:
        assert torch.isfinite(cache.values(layer)).all() and torch.isfinite(cache.keys(layer)).all()
        positions = cache.positions(layer)
        assert ((positions >= -1) & (positions < L)).all()
