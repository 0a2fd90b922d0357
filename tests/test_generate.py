"""generate(): greedy parity with transformers, sampling determinism, compression during generation; the CLIs."""

import os
import subprocess
import sys

import pytest
import torch

from minipythia import KnormPress, Pythia, SnapKV, generate
from minipythia.generate import sample

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def hf_and_model(tiny_hf_and_checkpoint):
    hf, ckpt = tiny_hf_and_checkpoint
    return hf, Pythia.from_pretrained(ckpt).for_inference()


def test_greedy_32_tokens_equal_transformers_generate(hf_and_model):
    hf, model = hf_and_model
    prompt = torch.randint(1, 512, (1, 24), generator=torch.Generator().manual_seed(1))
    expected = hf.generate(prompt, max_new_tokens=32, min_new_tokens=32, do_sample=False, pad_token_id=0)[0, 24:]
    got = generate(model, prompt[0], max_new_tokens=32).tokens
    assert got == expected.tolist()


def test_same_seed_same_sample_and_seed_matters(hf_and_model):
    _, model = hf_and_model
    prompt = list(range(1, 20))
    runs = [generate(model, prompt, 24, temperature=1.5, seed=s).tokens for s in (7, 7, 8)]
    assert runs[0] == runs[1]
    assert runs[0] != runs[2]


def test_top_k_1_and_tiny_top_p_are_greedy(hf_and_model):
    _, model = hf_and_model
    prompt = list(range(5, 30))
    greedy = generate(model, prompt, 16).tokens
    assert generate(model, prompt, 16, temperature=1.0, top_k=1, seed=0).tokens == greedy
    assert generate(model, prompt, 16, temperature=1.0, top_p=1e-6, seed=0).tokens == greedy


def test_top_k_never_samples_outside_the_k_best():
    logits = torch.tensor([0.0, 5.0, 4.0, -1.0, 3.0])
    g = torch.Generator().manual_seed(0)
    picks = {sample(logits, temperature=10.0, top_k=2, generator=g) for _ in range(200)}
    assert picks == {1, 2}


def test_top_p_keeps_the_smallest_set_covering_p():
    logits = torch.log(torch.tensor([0.5, 0.3, 0.15, 0.05]))
    g = torch.Generator().manual_seed(0)
    picks = {sample(logits, temperature=1.0, top_p=0.7, generator=g) for _ in range(300)}
    assert picks == {0, 1}  # 0.5 < 0.7 so the second token is needed; 0.8 >= 0.7 so the third is not


def test_compressed_generation_frees_memory_and_keeps_first_token(hf_and_model):
    _, model = hf_and_model
    prompt = torch.randint(1, 512, (100,), generator=torch.Generator().manual_seed(2)).tolist()
    full = generate(model, prompt, 8)
    snap = generate(model, prompt, 8, compressor=SnapKV(window_size=8, max_capacity_prompt=32, kernel_size=3))
    knorm = generate(model, prompt, 8, compressor=KnormPress(0.75))
    # The first token comes from the prefill, whose attention saw the full KV.
    assert snap.tokens[0] == full.tokens[0] == knorm.tokens[0]
    assert snap.kv_bytes_prefill == full.kv_bytes_prefill
    assert snap.kv_bytes_compressed == pytest.approx(full.kv_bytes_prefill * 32 / 100, rel=1e-6)
    assert knorm.kv_bytes_compressed == pytest.approx(full.kv_bytes_prefill * 25 / 100, rel=1e-6)
    assert snap.ttft_s > 0 and len(snap.step_s) == 7


def test_bad_arguments_raise(hf_and_model):
    _, model = hf_and_model
    with pytest.raises(ValueError, match="empty"):
        generate(model, [], 4)
    with pytest.raises(ValueError, match="temperature"):
        generate(model, [1, 2], 4, temperature=-1)
    with pytest.raises(ValueError, match="top_p"):
        generate(model, [1, 2], 4, temperature=1, top_p=0)


def test_past_trained_length_warns_but_runs(hf_and_model):
    _, model = hf_and_model
    limit = model.config.max_position_embeddings
    with pytest.warns(UserWarning, match="positions"):
        out = generate(model, [3] * (limit + 4), 3)
    assert len(out.tokens) == 3


def run(*args, **env):
    return subprocess.run([sys.executable, "-m", *args], capture_output=True, text=True, cwd=ROOT, timeout=120,
                          env={**os.environ, "HF_HUB_OFFLINE": "1", **env})


def test_cli_streams_text_and_prints_stats(tiny_checkpoint):
    r = run("minipythia.generate", "--model", str(tiny_checkpoint), "--prompt", "the quick brown fox",
            "--max-new-tokens", "12", "--ignore-eos", "--stats", "--compressor", "knorm", "--compression-ratio", "0.5")
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("the quick brown fox") and len(r.stdout) > len("the quick brown fox\n")
    assert "TTFT" in r.stderr and "TPOT" in r.stderr and "after compression" in r.stderr


def test_cli_no_echo_prints_the_generated_text_alone_and_warnings_after_it(tiny_checkpoint):
    """--no-echo: the echoed run's output without the prompt; the positions warning (the prompt runs past the
    model's trained positions) comes after the streamed text, on stderr, and names no other model."""
    prompt = " ".join(["the quick brown fox"] * 80)  # > 256 tokens, the tiny checkpoint's positions
    args = ("minipythia.generate", "--model", str(tiny_checkpoint), "--prompt", prompt, "--max-new-tokens", "6",
            "--ignore-eos")
    echoed, alone = run(*args), run(*args, "--no-echo")
    assert echoed.returncode == 0 and alone.returncode == 0, alone.stderr
    assert echoed.stdout == prompt + alone.stdout and alone.stdout.strip()
    merged = subprocess.run([sys.executable, "-m", *args], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, cwd=ROOT, timeout=120, env={**os.environ, "HF_HUB_OFFLINE": "1"}).stdout
    assert merged.startswith(echoed.stdout) and merged[len(echoed.stdout):].startswith("warning: ")
    assert "this model was trained on" in merged and "Pythia" not in merged


def test_cli_same_seed_same_text(tiny_checkpoint, tmp_path):
    prompt = tmp_path / "prompt.txt"
    prompt.write_text("seven old men read")
    args = ("minipythia.generate", "--model", str(tiny_checkpoint), "--prompt-file", str(prompt),
            "--max-new-tokens", "10", "--temperature", "1.0", "--top-p", "0.9", "--seed", "3", "--ignore-eos")
    a, b = run(*args), run(*args)
    assert a.returncode == 0 and a.stdout == b.stdout


@pytest.mark.parametrize("extra, message", [
    (["--prompt", ""], "prompt is empty"),
    (["--prompt-file", "/nonexistent/prompt.txt"], "cannot read --prompt-file"),
    (["--prompt-file", "/"], "Is a directory"),
    (["--prompt", "hi", "--compressor", "snapkv", "--kernel-size", "4"], "kernel_size"),
    (["--prompt", "hi", "--compressor", "knorm", "--compression-ratio", "1.0"], "compression_ratio"),
    (["--prompt", "hi", "--temperature", "-1"], "temperature"),
])
def test_cli_bad_input_is_one_line_exit_2(tiny_checkpoint, extra, message):
    r = run("minipythia.generate", "--model", str(tiny_checkpoint), *extra)
    assert r.returncode == 2
    assert "Traceback" not in r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and message in lines[0], r.stderr


@pytest.mark.parametrize("model", ["no-such-model", "EleutherAI/no-such-model", "/nonexistent/dir"])
def test_cli_unknown_model_is_one_line_exit_2(model):
    r = run("minipythia.generate", "--model", model, "--prompt", "hi")
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert r.stderr.strip().startswith("error:") and len(r.stderr.strip().splitlines()) == 1


def test_download_offline_says_what_to_do():
    r = run("minipythia.download", "EleutherAI/no-such-model")
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert "unreachable" in r.stderr


def test_the_clock_synchronises_a_cuda_device_before_reading(monkeypatch):
    """Every timing reads minipythia.timing.clock: on CUDA, work queued before the reading is finished first."""
    from minipythia.timing import clock

    calls = []
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: calls.append(device))
    clock("cpu")
    assert calls == []
    clock("cuda:0")
    assert calls == [torch.device("cuda:0")]
