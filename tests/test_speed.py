"""The speed protocol (eval.speed.measure) on a deterministic stand-in for generation, so that no assertion
depends on how fast this machine is: warm-up before anything is measured, interleaved repeats, per-repeat
figures, their paired intervals, and the report's table of them."""

from types import SimpleNamespace

import numpy as np
import pytest
import torch

import eval.speed
from eval.report import speed_table
from eval.speed import measure, speed_estimates
from minipythia import Generation
from minipythia.compressors import build_compressor
from minipythia.generate import WARMUP_STEPS

MODEL = SimpleNamespace(embed_in=SimpleNamespace(weight=torch.zeros(1)))  # measure() only asks for its device


class FakeGeneration:
    """Stands in for minipythia.generate: each call's times come from a cost model, not a clock. The first
    call at a prompt length is `cold` times slower (what a warm-up must absorb); the machine drifts slowly
    from call to call, with seeded noise on top; `slower` makes one configuration slower for real."""

    def __init__(self, cold: float = 3.0, noise: float = 0.05, slower: dict[str, float] | None = None):
        self.calls = []  # (label, prompt length, new tokens) in call order
        self.seen_lengths = set()
        self.random = np.random.default_rng(0)
        self.cold, self.noise, self.slower = cold, noise, slower or {}

    def __call__(self, model, prompt, new_tokens, compressor=None):
        length = prompt.shape[-1]
        self.calls.append((compressor.label, length, new_tokens))
        factor = 1.0 + 0.002 * len(self.calls)  # drift
        if length not in self.seen_lengths:
            self.seen_lengths.add(length)
            factor *= self.cold
        factor *= self.slower.get(compressor.label, 1.0)

        def jitter():
            return factor * (1 + self.noise * self.random.uniform(-1, 1))

        return Generation(tokens=[1] * new_tokens, ttft_s=1e-4 * length * jitter(),
                          step_s=[1e-3 * jitter() for _ in range(new_tokens - 1)])


def configs():
    # two configurations that do the same work at these prompt lengths: SnapKV keeps everything below C
    return [build_compressor("none"),
            build_compressor("snapkv", dict(window_size=4, max_capacity_prompt=4096, kernel_size=5, pooling="avgpool"))]


def run(monkeypatch, fake, repeats=5, lengths=(64, 128)):
    monkeypatch.setattr(eval.speed, "generate", fake)
    prompts = {n: torch.zeros(n, dtype=torch.long) for n in lengths}
    rows = measure(MODEL, prompts, configs(), WARMUP_STEPS + 4, repeats)
    none = {r["prompt_len"]: r for r in rows if r["label"] == "none"}
    for r in rows:  # as eval.sweep.measure_batch attaches it
        if r["label"] != "none":
            r["reference"] = {k: none[r["prompt_len"]][k] for k in eval.speed.REFERENCE_KEYS + eval.speed.RUN_KEYS}
    return rows


def test_every_config_warms_up_at_each_length_before_anything_is_measured(monkeypatch):
    fake = FakeGeneration()
    run(monkeypatch, fake, repeats=3)
    labels = {c.label for c in configs()}
    for length in (64, 128):
        at_length = [(label, n) for label, size, n in fake.calls if size == length]
        warmup = at_length[:len(labels)]
        assert {label for label, _ in warmup} == labels and all(n == WARMUP_STEPS + 2 for _, n in warmup)
        assert len(at_length) == len(labels) * 4 and all(n == WARMUP_STEPS + 4 for _, n in at_length[len(labels):])


def test_repeats_interleave_configs_and_rotate_the_first(monkeypatch):
    fake = FakeGeneration()
    run(monkeypatch, fake, repeats=4, lengths=(64,))
    measured = [label for label, _, n in fake.calls if n == WARMUP_STEPS + 4]
    firsts = measured[::2]  # each repeat runs both configs, then the next repeat starts
    assert all(measured[i] != measured[i + 1] for i in range(0, len(measured), 2))  # both in every repeat
    assert set(firsts) == {"none", configs()[1].label}  # neither config is always first


def test_identical_configs_measured_interleaved_give_ratio_intervals_containing_1(monkeypatch):
    rows = run(monkeypatch, FakeGeneration())
    for r in rows:
        assert len(r["ttft_runs_ms"]) == len(r["tpot_runs_ms"]) == 5
        assert r["ttft_ms"] == pytest.approx(np.mean(r["ttft_runs_ms"]))  # the row's figure is the estimate's
        if r["label"] == "none":
            continue
        estimates = speed_estimates(r)
        for key in ("ttft_ratio", "tpot_ratio"):
            e = estimates[key]
            assert e.n == 5 and e.low < e.high  # a real interval, not a point
            assert e.low <= 1 <= e.high and abs(e.mean - 1) < 0.05  # the cold first run is not in the figure
            assert e.mean == pytest.approx(r[key.replace("ratio", "ms")] / r["reference"][key.replace("ratio", "ms")])


def test_a_slower_config_gives_a_ratio_interval_excluding_1(monkeypatch):
    label = configs()[1].label
    rows = run(monkeypatch, FakeGeneration(slower={label: 1.5}))
    for r in rows:
        if r["label"] == label:
            e = speed_estimates(r)["tpot_ratio"]
            assert e.excludes(1.0) and 1.4 < e.mean < 1.6


def test_speed_table_marks_ratios_whose_interval_includes_1(monkeypatch):
    rows = run(monkeypatch, FakeGeneration(slower={configs()[1].label: 1.5}), lengths=(64,))
    same = run(monkeypatch, FakeGeneration(), lengths=(64,))
    text = speed_table(rows[:1] + [dict(rows[1], label="slower")] + [dict(same[1], label="same")])
    # columns: prompt, config, TTFT ms, TTFT vs none, compress ms, compress %, TPOT ms, TPOT vs none, ...
    line = {cells[1]: cells for cells in (line.split(" | ") for line in text.splitlines()[2:])}
    assert "[" in line["none"][2] and "[" not in line["none"][3]  # none: TTFT with its interval; vs itself: 1
    assert "[" in line["slower"][7] and "~1" not in line["slower"][7]  # TPOT 1.5x: distinguishable
    assert line["same"][7].endswith("~1") and line["same"][3].endswith("~1")


def test_rows_of_older_runs_without_repeats_still_render():
    ref = dict(engine="minipythia", label="none", compressor="none", settings={}, prompt_len=512, ttft_ms=100.0,
               compress_ms=0.0, tpot_ms=10.0, tok_s=100.0, kv_prefill_bytes=2**20, kv_compressed_bytes=2**20,
               kv_end_bytes=2**20, kept_after_prefill=512, peak_rss_mib=300.0)
    old = dict(ref, label="snapkv", compressor="snapkv", ttft_ms=108.0, compress_ms=8.0, tpot_ms=8.0,
               reference={k: ref[k] for k in eval.speed.REFERENCE_KEYS})
    assert speed_estimates(old) == {} and speed_estimates(ref) == {}
    text = speed_table([ref, old])
    assert "| 1.08x |" in text and "| 0.80x |" in text and "[" not in text


def test_identical_repeats_give_a_ratio_of_exactly_1():
    runs = [10.0, 12.0, 11.0]
    row = dict(ttft_runs_ms=runs, tpot_runs_ms=runs, reference=dict(ttft_runs_ms=runs, tpot_runs_ms=runs))
    e = speed_estimates(row)["tpot_ratio"]
    assert (e.mean, e.low, e.high) == (1.0, 1.0, 1.0) and not e.excludes(1.0)
