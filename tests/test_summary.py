"""OUT/summary.csv and the report's intervals, on a real sweep of the tiny checkpoint: the figures match the
records and the report, identical configurations differ by exactly 0, and the oracle runs where the future is
known (PPL windows, tasks) with its headroom share."""

import csv
import json
import math

import pytest
import torch

from eval import stats
from eval.__main__ import main
from eval.results import read_jsonl
from minipythia import Oracle, Prefill, Pythia, oracle_future_queries
from minipythia.cli import run_cli

from test_sweep import WORDS

# snapkv at C=64 holds the whole 32-token window prompt: the same cache as none's, so the same figures.
CONFIG = """
data: {books}
ctx_len: 48
stride: 16
max_tokens: 160
tasks:
  - ppl: {{short_context: 8}}
  - recall: {{contexts: [64], depths: [0.25, 0.5], trials: 3, passage_tokens: 8, cue_tokens: 3}}
  - continuation: {{contexts: [40], trials: 2, new_tokens: 6, control_context: 8}}
speed: {{prompt_lengths: [24], new_tokens: 5, repeats: 1}}
policies:
  - {{compressor: none}}
  - {{compressor: snapkv, window_size: 4, max_capacity_prompt: [12, 64]}}
  - {{compressor: streaming_llm, n_sink: 2, max_capacity_prompt: 12}}
  - {{compressor: oracle, max_capacity_prompt: 12}}
"""
LABELS = ["none", "snapkv_w4_c12_k5_avgpool", "snapkv_w4_c64_k5_avgpool", "streaming_llm_sink2_c12", "oracle_c12"]


@pytest.fixture(scope="module")
def summarized(tiny_checkpoint, tmp_path_factory):
    root = tmp_path_factory.mktemp("summary")
    g = torch.Generator().manual_seed(3)
    books = root / "books"
    books.mkdir()
    for name in ("alpha", "beta"):
        (books / f"{name}.txt").write_text("\n".join(
            " ".join(WORDS[j] for j in torch.randint(len(WORDS), (10,), generator=g)) + "." for _ in range(30)))
    (root / "sweep.yaml").write_text(CONFIG.format(books=books))
    out = root / "out"
    assert run_cli(main, ["sweep", str(root / "sweep.yaml"), "--model", str(tiny_checkpoint), "--out", str(out)]) == 0
    rows = list(csv.DictReader((out / "summary.csv").open()))
    return out, rows


def pick(rows, config, metric, vs=None):
    found = [r for r in rows if r["config"] == config and r["metric"] == metric and (vs is None or r["vs"] == vs)]
    assert found, (config, metric, vs)
    return found[0]


def test_summary_means_are_the_records_figures(summarized):
    out, rows = summarized
    assert list(rows[0])[:9] == ["model", "revision", "config", "metric", "prompt_len", "mean", "ci_low", "ci_high",
                                 "n"]
    assert list(dict.fromkeys(r["config"] for r in rows)) == LABELS
    for label in LABELS:
        records = read_jsonl(out / label / "ppl.jsonl")
        ppl = pick(rows, label, "ppl")
        nll, tokens = sum(r["nll_sum"] for r in records), sum(r["tokens"] for r in records)
        assert float(ppl["mean"]) == pytest.approx(math.exp(nll / tokens), rel=1e-12)
        assert int(ppl["n"]) == sum(len(r["windows"]["tokens"]) for r in records)  # the books' windows
        assert float(ppl["ci_low"]) <= float(ppl["mean"]) <= float(ppl["ci_high"])
        recall = read_jsonl(out / label / "recall.jsonl")
        r = pick(rows, label, "retained_recall")
        assert int(r["n"]) == len(recall) == 6
        assert float(r["mean"]) == pytest.approx(sum(x["weight"] * x["gain"] for x in recall) /
                                                 sum(x["weight"] * x["gain_full"] for x in recall), rel=1e-12)


def test_window_sums_add_up_to_the_record(summarized):
    out, _ = summarized
    for r in read_jsonl(out / "snapkv_w4_c12_k5_avgpool" / "ppl.jsonl"):
        w = r["windows"]
        assert sum(w["tokens"]) == r["tokens"] and sum(w["compressed_tokens"]) == r["compressed_tokens"]
        assert w["compressed_tokens"][0] == 0  # the first window has no prompt
        for key, total in (("nll", "nll_sum"), ("nll_compressed", "nll_compressed_sum"),
                           ("nll_short", "nll_short_sum"), ("key_nll_full", "key_nll_full_sum")):
            assert sum(w[key]) == pytest.approx(r[total], rel=1e-12, abs=1e-9)


def test_identical_caches_differ_by_exactly_zero(summarized):
    _, rows = summarized
    for metric in ("ppl", "retained_ppl", "retained_recall"):
        r = pick(rows, "snapkv_w4_c64_k5_avgpool", metric, vs="none")
        assert (float(r["diff"]), float(r["diff_low"]), float(r["diff_high"])) == (0.0, 0.0, 0.0)
        assert r["distinguishable"] == "False"


def test_the_report_shows_the_summary_figures(summarized):
    out, rows = summarized
    report = (out / "report.md").read_text()
    for label in ("none", "snapkv_w4_c12_k5_avgpool"):
        r = pick(rows, label, "ppl")
        est = stats.Estimate(float(r["mean"]), float(r["ci_low"]), float(r["ci_high"]), int(r["n"]))
        assert f"| {est.text(3)} | {r['n']} |" in report
        r = pick(rows, label, "retained_recall")
        assert stats.Estimate(float(r["mean"]), float(r["ci_low"]), float(r["ci_high"]), 6).text(3) in report
    assert "## Paired differences" in report
    # A task's raw metrics are in the summary too, each a mean over the examples.
    records = read_jsonl(out / "oracle_c12" / "continuation.jsonl")
    assert float(pick(rows, "oracle_c12", "continuation.rouge_l")["mean"]) == pytest.approx(
        sum(r["rouge_l"] for r in records) / len(records))


def test_the_oracle_runs_where_the_future_is_known_and_is_not_timed(summarized):
    out, rows = summarized
    sweep = json.loads((out / "sweep.json").read_text())
    oracle = next(c for c in sweep["configs"] if c["label"] == "oracle_c12")
    assert oracle["timed"] is False and not sweep["skipped"]
    assert not (out / "oracle_c12" / "speed.jsonl").exists()
    # Speed is in the summary too: each timed configuration's ratios against none, at each prompt length.
    timed = {r["config"] for r in rows if r["metric"] == "tpot_ratio" and r["prompt_len"] == "24"}
    assert timed == set(LABELS) - {"none", "oracle_c12"}
    (speed,) = read_jsonl(out / "snapkv_w4_c12_k5_avgpool" / "speed.jsonl")
    ratio = pick(rows, "snapkv_w4_c12_k5_avgpool", "ttft_ratio")
    assert float(ratio["mean"]) == pytest.approx(speed["ttft_ms"] / speed["reference"]["ttft_ms"])
    assert "Unfinished" not in (out / "report.md").read_text()
    # Its headroom share: 1 for itself, the worst at its budget 0, the others between.
    shares = {r["config"]: float(r["oracle_share"]) for r in rows if r["metric"] == "retained_recall"
              and r["oracle_share"] and r["vs"] == "none"}
    assert shares["oracle_c12"] == pytest.approx(1.0) and min(shares.values()) == pytest.approx(0.0)
    assert set(shares) == {"oracle_c12", "snapkv_w4_c12_k5_avgpool", "streaming_llm_sink2_c12"}


def test_the_oracle_in_a_replay_equals_the_python_api(tiny_checkpoint):
    """eval.replay gives the oracle the targets' queries: the same kept set as oracle_future_queries by hand."""
    from eval.replay import Kept, score_replays

    model = Pythia.from_pretrained(tiny_checkpoint).for_inference()
    ids = torch.randint(0, model.config.vocab_size, (2, 40), generator=torch.Generator().manual_seed(0))
    prompt, targets = ids[:, :30], ids[:, 30:]
    prefill = Prefill.record(model, prompt)
    oracle = Oracle(max_capacity_prompt=10)
    seen = []
    score_replays(model, prefill, [oracle], targets, lambda logits: seen.append(logits) or 0)
    assert oracle.future_queries == {}  # forgotten after the replay

    by_hand = Oracle(max_capacity_prompt=10)
    by_hand.future_queries = oracle_future_queries(model, prompt, targets)
    cache = model.new_cache(2, by_hand)
    with torch.inference_mode():
        logits = torch.cat((model(prompt, cache=cache, last_only=True), model(targets[:, :-1], cache=cache)), 1)
    torch.testing.assert_close(seen[0], logits.float(), rtol=1e-5, atol=1e-5)
    oracle.see_future(oracle_future_queries(model, prompt, targets))
    replayed = Kept.of(prefill.replay(model, oracle)).positions
    for layer, kept in enumerate(replayed):  # the by-hand cache holds the targets after the kept prompt entries
        assert kept.shape[-1] == 10 and torch.equal(kept, cache.positions(layer)[..., :10])


def test_a_baseline_that_is_not_in_the_sweep_is_one_line(summarized, capsys):
    out, _ = summarized
    assert run_cli(main, ["report", str(out), "--baseline", "nope"]) == 2
    err = capsys.readouterr().err
    assert "--baseline 'nope' is not a configuration" in err and "Traceback" not in err


def test_a_named_baseline_adds_its_comparisons(summarized):
    out, _ = summarized
    assert run_cli(main, ["report", str(out), "--baseline", "streaming_llm_sink2_c12"]) == 0
    rows = list(csv.DictReader((out / "summary.csv").open()))
    r = pick(rows, "snapkv_w4_c12_k5_avgpool", "retained_recall", vs="streaming_llm_sink2_c12")
    mine, theirs = (float(pick(rows, c, "retained_recall")["mean"]) for c in
                    ("snapkv_w4_c12_k5_avgpool", "streaming_llm_sink2_c12"))
    assert float(r["diff"]) == pytest.approx(mine - theirs)
    assert r["distinguishable"] == str(not float(r["diff_low"]) <= 0 <= float(r["diff_high"]))
    assert "against streaming_llm_sink2_c12" in (out / "report.md").read_text()
