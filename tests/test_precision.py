"""minipythia/precision.py: native bf16 from the CPU's flags, and the MINIPYTHIA_BF16_PREFILL choice."""

import pytest
import torch

from minipythia import Pythia, PythiaConfig
from minipythia import precision


@pytest.mark.parametrize("flags,native", [
    ("flags\t\t: fpu sse2 avx2 fma", False),
    ("flags\t\t: fpu avx2 avx512f avx512_bf16", True),
    ("flags\t\t: fpu avx512f amx_bf16 amx_tile", True),
    ("Features\t: fp asimd sve bf16 i8mm", True),
    ("Features\t: fp asimd", False),
])
def test_native_bfloat16_reads_the_cpu_flags(tmp_path, flags, native):
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text(f"processor\t: 0\n{flags}\n\nprocessor\t: 1\n{flags}\n")
    assert precision.native_bfloat16(str(cpuinfo)) is native


def test_without_cpuinfo_pure_bf16_is_kept(tmp_path):
    assert precision.native_bfloat16(str(tmp_path / "absent")) is True


@pytest.mark.parametrize("choice,native,expected", [
    ("float32", True, True), ("bfloat16", False, False), ("auto", False, True), ("auto", True, False),
    ("", False, True), (" Float32 ", True, True)])
def test_the_environment_variable_chooses(monkeypatch, choice, native, expected):
    monkeypatch.setenv(precision.ENV, choice)
    monkeypatch.setattr(precision, "native_bfloat16", lambda: native)
    assert precision.float32_prefill_default() is expected


def test_a_bad_choice_names_the_variable_and_the_choices(monkeypatch):
    monkeypatch.setenv(precision.ENV, "fp16")
    with pytest.raises(ValueError, match="MINIPYTHIA_BF16_PREFILL='fp16': choose auto, float32 or bfloat16"):
        precision.float32_prefill_default()


def test_for_inference_applies_it_to_bf16_models_on_cpu_only(monkeypatch):
    config = PythiaConfig(vocab_size=64, hidden_size=32, num_attention_heads=2, num_hidden_layers=1,
                          intermediate_size=64, max_position_embeddings=64)
    monkeypatch.setenv(precision.ENV, "float32")
    assert Pythia(config).to(torch.bfloat16).for_inference().float32_prefill
    assert not Pythia(config).for_inference().float32_prefill  # float32 weights: nothing to do
    monkeypatch.setenv(precision.ENV, "bfloat16")
    assert not Pythia(config).to(torch.bfloat16).for_inference().float32_prefill
    assert Pythia(config).to(torch.bfloat16).for_inference(float32_prefill=True).float32_prefill  # the argument wins
    monkeypatch.setenv(precision.ENV, "fp16")
    Pythia(config).for_inference()  # a float32 model never reads the variable


def test_a_sweep_does_not_mix_bf16_products_in_one_folder(tiny_checkpoint, tmp_path, monkeypatch, capsys):
    """A bf16 sweep multiplying in float32 records it in its settings: a pure bf16 run into the same folder (one
    made before the choice existed, or with MINIPYTHIA_BF16_PREFILL=bfloat16) is refused in one line."""
    from eval.__main__ import main
    from minipythia.cli import run_cli

    books = tmp_path / "books"
    books.mkdir()
    (books / "a.txt").write_text(" ".join(["the quick brown fox jumps over a lazy dog"] * 30))
    (tmp_path / "s.yaml").write_text(f"data: {books}\ndtype: bfloat16\nctx_len: 64\nstride: 32\nmax_tokens: 128\n"
                                     f"policies:\n  - {{compressor: none}}\n")
    argv = ["sweep", str(tmp_path / "s.yaml"), "--model", str(tiny_checkpoint), "--out", str(tmp_path / "out")]
    monkeypatch.setenv(precision.ENV, "float32")
    assert run_cli(main, argv) == 0
    sweep = (tmp_path / "out" / "sweep.json").read_text()
    assert '"bf16_products": "float32"' in sweep
    capsys.readouterr()
    monkeypatch.setenv(precision.ENV, "bfloat16")
    assert run_cli(main, argv) == 2
    assert "bf16_products: \"float32\" there, none now" in capsys.readouterr().err.replace("'", '"')
