"""Fault injection: a sweep killed (SIGKILL) at random points and resumed each time ends with the same results
as a run that was never interrupted: every (book, configuration) scored once, with the same NLLs."""

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

from eval.__main__ import main as eval_main
from eval.results import read_jsonl
from minipythia.cli import run_cli

ROOT = Path(__file__).resolve().parents[1]
WORDS = "the quick brown fox jumps over a lazy dog while seven old men read long books by the sea".split()
KILLS = 6


def results(out: Path) -> dict:
    """(book, label) -> (tokens, nll_sum), checking that no pair was written twice."""
    pairs = {}
    for path in sorted(out.glob("*/ppl.jsonl")):
        for r in read_jsonl(path):
            key = (r["book"], r["label"])
            assert key not in pairs, f"{key} scored twice"
            pairs[key] = (r["tokens"], r["nll_sum"])
    return pairs


def test_a_sweep_killed_at_random_points_resumes_to_identical_results(tiny_checkpoint, tmp_path):
    books = tmp_path / "books"
    books.mkdir()
    rng = random.Random(0)
    for name in ("a", "b", "c"):
        (books / f"{name}.txt").write_text(" ".join(rng.choice(WORDS) for _ in range(900)))
    config = tmp_path / "sweep.yaml"
    config.write_text(f"""
model: {tiny_checkpoint}
data: {books}
ctx_len: 48
stride: 8
max_tokens: null
batch_size: 1
policies:
  - {{compressor: none}}
  - {{compressor: knorm, compression_ratio: [0.25, 0.5, 0.75]}}
  - {{compressor: snapkv, window_size: 4, max_capacity_prompt: [8, 16, 24]}}
  - {{compressor: h2o, max_capacity_prompt: [8, 16]}}
""")
    started = time.perf_counter()
    assert run_cli(eval_main, ["sweep", str(config), "--out", str(tmp_path / "reference")]) == 0
    run_seconds = time.perf_counter() - started
    reference = results(tmp_path / "reference")
    assert len(reference) == 3 * 9

    out = tmp_path / "killed"
    command = [sys.executable, "-m", "eval", "sweep", str(config), "--out", str(out)]
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    killed_mid_run, progress = 0, []
    for _ in range(KILLS):
        before = len(results(out)) if out.is_dir() else 0
        process = subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        # Killed at a random moment once the run has written something new (however slow the machine is today):
        # mid-run, unless it had nothing left to do.
        while process.poll() is None and (len(results(out)) if out.is_dir() else 0) == before:
            time.sleep(0.05)
        time.sleep(rng.uniform(0.0, run_seconds / 9))
        if process.poll() is None:
            process.send_signal(signal.SIGKILL)
            killed_mid_run += 1
        process.wait()
        progress.append(len(results(out)) if out.is_dir() else 0)
    final = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert final.returncode == 0, final.stderr
    assert killed_mid_run >= 3, f"only {killed_mid_run} of {KILLS} kills landed during a run: {progress}"
    assert results(out) == reference, progress
    held = [c["label"] for c in json.loads((out / "sweep.json").read_text())["configs"]]
    assert held == [c["label"] for c in json.loads((tmp_path / "reference" / "sweep.json").read_text())["configs"]]
    print(f"{killed_mid_run} kills during a run, pairs complete after each: {progress}; all {len(reference)} "
          f"identical to the uninterrupted run")
