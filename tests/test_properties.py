"""Property-based tests of the validators: whatever a user types, a command either runs or says in one line
what is wrong (exit code 2), and the library raises ValueError / TypeError, never anything deeper."""

import re

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from eval.grid import ConfigError, parse_spec
from minipythia import COMPRESSORS, build_compressor
from minipythia.cli import run_cli
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
