"""A policy written outside the package, in one file, works everywhere a built-in one does: the Python API,
decode-time compression, the command line (its settings appear as flags by themselves) and sweep YAML."""

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from eval.__main__ import main as eval_main
from eval.results import read_jsonl
from minipythia import COMPRESSORS, StreamingLLM, build_compressor, generate, import_policies
from minipythia.cli import run_cli

ROOT = Path(__file__).resolve().parents[1]

# The newcomer's file: nothing else is edited. It keeps the `budget` most recent entries, which is
# StreamingLLM without sinks, so its results can be checked against StreamingLLM(n_sink=0).
POLICY = textwrap.dedent('''
    from dataclasses import dataclass

    import torch

    from minipythia import CapacityBudget, Compressor, register


    @register
    @dataclass
    class Newest(CapacityBudget, Compressor):
        """Keeps the max_capacity_prompt most recent entries."""

        name = "newest"
        max_capacity_prompt: int = 256

        def decode_queries(self):
            return 0  # ranks entries by position: reads no query

        def score(self, layer, keys, values, queries):
            return torch.arange(keys.size(2), dtype=torch.float32, device=keys.device).expand(keys.shape[:3])
''')


@pytest.fixture
def policy_file(tmp_path):
    path = tmp_path / "newest_policy.py"
    path.write_text(POLICY)
    before = dict(COMPRESSORS)
    yield path
    COMPRESSORS.clear()  # the other tests see the built-in registry only
    COMPRESSORS.update(before)


@pytest.fixture(scope="module")
def model(tiny_checkpoint):
    from minipythia import Pythia

    return Pythia.from_pretrained(tiny_checkpoint).for_inference()


def test_the_python_api_and_decode_time_compression(policy_file, model):
    import_policies([str(policy_file)])
    newest = build_compressor("newest", {"max_capacity_prompt": 8})
    assert newest.label == "newest_c8"
    prompt = torch.randint(0, model.config.vocab_size, (20,), generator=torch.Generator().manual_seed(0)).tolist()
    ours = generate(model, prompt, max_new_tokens=12, compressor=newest, decode_interval=2)
    same = generate(model, prompt, max_new_tokens=12, compressor=StreamingLLM(n_sink=0, max_capacity_prompt=8),
                    decode_interval=2)
    assert ours.tokens == same.tokens and ours.kept_after_prefill == 8 and ours.kv_bytes_end == same.kv_bytes_end
    cache = model.new_cache(1, newest, decode_interval=2)
    model(torch.tensor([prompt]), cache=cache)
    for token in range(5):
        model(torch.tensor([[token]]), cache=cache)
    n = cache.seen
    kept = cache.positions(0)[0, 0].tolist()
    assert kept == list(range(n - len(kept), n)) and len(kept) <= 8 + 2


def test_the_command_line_takes_it_with_its_flags(policy_file, tiny_checkpoint):
    prompt = "the quick brown fox jumps over a lazy dog while seven old men read"
    r = subprocess.run([sys.executable, "-m", "minipythia.generate", "--model", str(tiny_checkpoint), "--prompt", prompt,
                        "--policy-module", str(policy_file), "--compressor", "newest", "--max-capacity-prompt", "4",
                        "--decode-interval", "2", "--max-new-tokens", "6", "--ignore-eos", "--stats"],
                       capture_output=True, text=True, cwd=ROOT, timeout=120, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert r.returncode == 0, r.stderr
    assert "compressor newest_c4" in r.stderr and "entries per head in layer 0" in r.stderr


def test_a_sweep_names_it_in_yaml(policy_file, tiny_checkpoint, tmp_path):
    words = "the quick brown fox jumps over a lazy dog while seven old men read long books by the sea".split()
    (tmp_path / "book.txt").write_text(" ".join(words[i * 7 % len(words)] for i in range(150)))
    config = tmp_path / "grid.yaml"
    config.write_text(textwrap.dedent(f"""
        model: {tiny_checkpoint}
        data: {tmp_path / "book.txt"}
        max_tokens: 120
        ctx_len: 48
        stride: 16
        policy_modules: [{policy_file.name}]   # next to the YAML
        policies:
          - {{compressor: newest, max_capacity_prompt: [8, 16]}}
          - {{compressor: streaming_llm, n_sink: 0, max_capacity_prompt: 16}}
    """))
    assert run_cli(eval_main, ["sweep", str(config), "--out", str(tmp_path / "out")]) == 0
    out = tmp_path / "out"
    labels = [c["label"] for c in json.loads((out / "sweep.json").read_text())["configs"]]
    assert labels == ["newest_c8", "newest_c16", "streaming_llm_sink0_c16"]
    ours, theirs = (read_jsonl(out / label / "ppl.jsonl")[0] for label in ("newest_c16", "streaming_llm_sink0_c16"))
    assert ours["nll_sum"] == theirs["nll_sum"] and ours["kept_per_head"] == 16
    assert read_jsonl(out / "newest_c8" / "ppl.jsonl")[0]["nll_sum"] != ours["nll_sum"]
    assert "| newest_c8 |" in (out / "report.md").read_text()


def test_registration_refuses_what_the_system_could_not_use():
    from dataclasses import dataclass

    from minipythia import Compressor, register

    with pytest.raises(ValueError, match="already registered"):
        @register
        @dataclass
        class Impostor(Compressor):
            name = "snapkv"

            def keep_count(self, layer, seq_len):
                return seq_len

            def score(self, layer, keys, values, queries):
                return keys[..., 0]

    with pytest.raises(TypeError, match="keep_count"):
        @register
        @dataclass
        class Half(Compressor):
            name = "half"

    with pytest.raises(TypeError, match="a setting is an int, float, str, bool"):
        @register
        @dataclass
        class Odd(Compressor):
            name = "odd"
            weights: dict = None

            def keep_count(self, layer, seq_len):
                return seq_len

            def score(self, layer, keys, values, queries):
                return keys[..., 0]
    assert not {"half", "odd"} & set(COMPRESSORS) and COMPRESSORS["snapkv"].__name__ == "SnapKV"
