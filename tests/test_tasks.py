"""Tasks beyond PPL: the recall task's examples and scores, PPL's references (KL, top-1, retained), the
`tasks:` key of sweep YAML, the sweep running tasks (resumable), `python -m eval task` and the report.

The scores that need a model that has learnt something use the embedded weights/tiny-pg19 on text it
sampled itself (no data needed); the plumbing uses the tiny random checkpoint.
"""

from __future__ import annotations

import json

import pytest
import torch

import eval.ppl
import eval.sweep
import eval.units
import eval.tasks.base
from eval.__main__ import main
from eval.grid import ConfigError, parse_spec
from eval.ppl import sliding_window_nll, sliding_window_scores
from eval.results import read_jsonl
from conftest import score_examples
from eval.tasks import TextSource, build_task, sample_text
from minipythia import H2O, NoCompression, Pythia, SnapKV, StreamingLLM, Tokenizer
from minipythia.cli import run_cli
from minipythia.weights import EMBEDDED_MODEL

META = dict(model="m", revision=None, dtype="float32")


@pytest.fixture(scope="module")
def model():
    return Pythia.from_pretrained(EMBEDDED_MODEL).for_inference()


@pytest.fixture(scope="module")
def text(model):
    return TextSource(sample_text(model, 3, 1024, seed=0), "sampled", Tokenizer.from_pretrained(EMBEDDED_MODEL))


def scored(task, model, text, configs, tmp_path):
    score_examples(task, model, task.examples(text, model), configs, META, lambda c: tmp_path / f"{c.label}.jsonl")
    return {c.label: read_jsonl(tmp_path / f"{c.label}.jsonl") for c in configs}


# --- recall ----------------------------------------------------------------------------------------------

def test_recall_puts_the_passage_where_it_says(model, text):
    task = build_task("recall", dict(contexts=[300, 900], depths=[0.0, 0.5, 1.0], trials=2))
    examples = task.examples(text, model)
    assert len(examples) == 2 * 2 * 3
    for e in examples:
        context, depth, at = e.key["context"], e.key["depth"], e.info["passage_at"]
        assert e.prompt.numel() == e.control.numel() == context
        assert at == round(depth * (context - 64))
        passage = e.prompt[at : at + 64]
        assert torch.equal(e.targets, passage) and e.scored == 64 - 8  # the cue, then the rest, scored
        # the control differs only in the passage's span, which holds the haystack's next tokens instead
        assert torch.equal(e.prompt[:at], e.control[:at]) and torch.equal(e.prompt[at + 64 :], e.control[at + 64 :])
        hay_name, hay_start = e.info["haystack"].split("@")
        hay = dict(text.streams)[hay_name][int(hay_start) :]
        assert torch.equal(e.prompt[:at], hay[:at]) and torch.equal(e.prompt[at + 64 :], hay[at : context - 64])
        assert torch.equal(e.control[at : at + 64], hay[context - 64 : context])
        source, start = e.info["passage_from"].split("@")
        assert source != hay_name and torch.equal(passage, dict(text.streams)[source][int(start) : int(start) + 64])
    assert examples[0].info["passage_at"] == 0 and examples[2].info["passage_at"] == 300 - 64


def test_recall_cue_in_prompt_moves_the_cue_into_the_compressed_prompt(model, text):
    task = build_task("recall", dict(contexts=[300], depths=[0.5], trials=1, cue_in_prompt=True))
    (e,) = task.examples(text, model)
    passage = e.prompt[e.info["passage_at"] : e.info["passage_at"] + 64]
    assert e.prompt.numel() == 308 and torch.equal(e.prompt[-8:], passage[:8]) and torch.equal(e.control[-8:],
                                                                                            passage[:8])
    assert torch.equal(e.targets, passage[8:]) and e.scored == 56


def test_recall_examples_are_deterministic_for_a_seed(model, text):
    settings = dict(contexts=[300], depths=[0.5], trials=2)
    a, b = (build_task("recall", settings).examples(text, model) for _ in range(2))
    other = build_task("recall", dict(settings, seed=1)).examples(text, model)
    assert all(torch.equal(x.prompt, y.prompt) and torch.equal(x.targets, y.targets) for x, y in zip(a, b))
    assert not all(torch.equal(x.targets, y.targets) for x, y in zip(a, other))
    shuffled = build_task("recall", dict(settings, passage="shuffled")).examples(text, model)
    assert all(sorted(x.targets.tolist()) == sorted(y.targets.tolist()) and not torch.equal(x.targets, y.targets)
               for x, y in zip(a, shuffled))


def test_recall_full_kv_and_keep_all_retain_exactly_everything(model, text, tmp_path):
    task = build_task("recall", dict(contexts=[400], depths=[0.2, 0.8], trials=2))
    records = scored(task, model, text, [NoCompression(), SnapKV(max_capacity_prompt=512)], tmp_path)
    for label, rows in records.items():
        assert len(rows) == 4
        assert all(r["retained"] == 1.0 and r["gain"] == r["gain_full"] and r["nll"] == r["nll_full"] for r in rows)
    # tiny-pg19 recalls a passage it was shown: full KV is much better than the control
    assert sum(r["gain_full"] for r in records["none"]) / 4 > 0.3


def test_recall_a_window_that_cannot_reach_the_passage_gains_nothing(model, text, tmp_path):
    task = build_task("recall", dict(contexts=[900], depths=[0.1], trials=3))
    records = scored(task, model, text, [StreamingLLM(n_sink=4, max_capacity_prompt=64),
                                         SnapKV(max_capacity_prompt=256)], tmp_path)
    for r in records["streaming_llm_sink4_c64"]:  # the passage ends at token ~147, the window starts at ~840
        assert r["gain_full"] > 0.2 and abs(r["gain"]) < 0.25 * r["gain_full"], r
    snap = records["snapkv_w32_c256_k5_avgpool"]
    assert sum(r["gain"] for r in snap) > sum(r["gain"] for r in records["streaming_llm_sink4_c64"])


def test_recall_rejects_settings_it_cannot_use(model, text):
    for settings, message in ((dict(depths=[1.5]), "depths"), (dict(cue_tokens=64), "cue_tokens"),
                              (dict(trials=0), "trials"), (dict(passage="words"), "passage"),
                              (dict(contexts=[2000]), "trained"), (dict(contexts=[40]), "cannot hold")):
        with pytest.raises(ValueError, match=message):
            build_task("recall", settings).examples(text, model)
    with pytest.raises(ValueError, match="no setting 'depth'"):
        build_task("recall", dict(depth=[0.5]))
    with pytest.raises(ValueError, match="unknown task"):
        build_task("recal", {})


# --- PPL's references ------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def book_ids(text):
    return text.streams[0][1][:700]


def test_ppl_none_and_keep_all_have_no_kl_and_full_agreement(model, book_ids):
    none, keep_all, snap = sliding_window_scores(model, book_ids, 256, 64, [NoCompression(), SnapKV(
        max_capacity_prompt=256), SnapKV(max_capacity_prompt=64, window_size=8)], short_context=32)
    for s in (none, keep_all):
        assert torch.equal(s.kl, torch.zeros_like(s.kl)) and bool(s.top1.all())
        assert torch.equal(s.compressed_nll, s.full_nll)
    assert snap.kl.mean() > 0 and not bool(snap.top1.all())
    assert snap.compressed_nll.numel() == book_ids.numel() - 256  # every token after the first window
    assert torch.equal(snap.nll[-snap.compressed_nll.numel():], snap.compressed_nll)
    assert bool((snap.kl >= -1e-6).all())


def test_ppl_short_context_control_is_the_same_targets_from_their_last_tokens(model, book_ids):
    """The control of a window of prompt P predicts its targets from the P's last short tokens (and the
    window's earlier targets): exactly HF-style windows of short + stride tokens, whose targets fall on the
    same tokens when short is a multiple of the stride."""
    (scores,) = sliding_window_scores(model, book_ids, 256, 64, [None], short_context=64)
    windows_of_the_control = sliding_window_nll(model, book_ids, 64 + 64, 64)
    # (one uncached forward there, a prefill and a cached forward here: equal to float rounding)
    torch.testing.assert_close(scores.short_nll, windows_of_the_control[256 - 1 :], rtol=0, atol=1e-4)


def test_ppl_records_carry_retained_and_key_tokens(tiny_checkpoint, tmp_path, model, book_ids):
    from eval.ppl import book_records, ppl_base

    (none, h2o), _ = book_records(model, "b", "s", book_ids, [NoCompression(), H2O(max_capacity_prompt=64)],
                                  ppl_base(META, "window", 256, 64, None), 256, 64, short_context=32)
    assert none["retained"] == 1.0 and none["kl"] == 0.0 and none["top1"] == 1.0 and none["short_context"] == 32
    assert none["compressed_tokens"] == h2o["compressed_tokens"] == 700 - 256
    assert h2o["kl"] > 0 and h2o["retained"] < 1.0 and h2o["gain_full"] == none["gain_full"] > 0
    assert h2o["retained"] == pytest.approx((h2o["nll_short_sum"] - h2o["nll_compressed_sum"])
                                            / (h2o["nll_short_sum"] - h2o["nll_full_sum"]))
    assert h2o["key_tokens"] == none["key_tokens"] and none["retained_key"] in (1.0, None)


# --- sweep YAML, the sweep, the CLI ----------------------------------------------------------------------

def spec(text: str):
    from pathlib import Path

    return parse_spec(text, Path("t.yaml"))


def test_tasks_key_lists_names_or_settings():
    s = spec("tasks: [ppl, {recall: {trials: 3, depths: [0.5]}}]\npolicies: [{compressor: none}]\n")
    assert s.ppl and s.short_context == 128 and [t.name for t in s.tasks] == ["recall"]
    assert s.tasks[0].trials == 3 and s.tasks[0].depths == (0.5,)
    s = spec("tasks: {recall: null, ppl: {short_context: 64}}\npolicies: [{compressor: none}]\n")
    assert s.ppl and s.short_context == 64 and s.tasks[0].trials == 2
    s = spec("tasks: [recall]\npolicies: [{compressor: none}]\n")
    assert not s.ppl and s.tasks
    assert spec("policies: [{compressor: none}]\n").ppl  # no tasks: PPL, as before


@pytest.mark.parametrize("yaml_text, message", [
    ("tasks: [ppl, recal]", "unknown task 'recal'"),
    ("tasks: [{recall: {trial: 3}}]", "no setting 'trial'"),
    ("tasks: [{recall: {trials: two}}]", "trials must be an int"),
    ("tasks: [{ppl: {short_context: 0}}]", "short_context must be an integer >= 1"),
    ("tasks: [{ppl: {stride: 4}}]", "no setting 'stride'"),
    ("tasks: [recall, recall]", "listed twice"),
    ("tasks: []", "non-empty list"),
    ("tasks: [ppl]\nppl: true", "not both"),
    ("tasks: [ppl, recall]\nmode: stream\ndecode_interval: 8", "mode: window"),
])
def test_bad_tasks_are_config_errors(yaml_text, message):
    with pytest.raises(ConfigError, match=message):
        spec(yaml_text + "\npolicies: [{compressor: none}]\n")


SWEEP = """
data: {books}
ctx_len: 48
stride: 16
max_tokens: 96
tasks:
  - ppl: {{short_context: 8}}
  - recall: {{contexts: [64], depths: [0.2, 0.8], trials: 1, passage_tokens: 16, cue_tokens: 4}}
  - needle: {{kinds: [passkey], contexts: [120], depths: [0.5], trials: 1}}
  - continuation: {{contexts: [64], new_tokens: 4, trials: 1, control_context: 8}}
policies:
  - {{compressor: none}}
  - {{compressor: snapkv, window_size: 4, max_capacity_prompt: 16}}
"""


def test_a_sweep_runs_its_tasks_resumes_them_and_reports_retained(tiny_checkpoint, tmp_path, monkeypatch, capsys):
    books = tmp_path / "books"
    books.mkdir()
    words = "the quick brown fox jumps over a lazy dog while seven old men read long books by the sea".split()
    g = torch.Generator().manual_seed(3)
    for name in ("alpha", "beta"):
        (books / f"{name}.txt").write_text(" ".join(words[int(i)] for i in torch.randint(len(words), (400,),
                                                                                          generator=g)))
    (tmp_path / "s.yaml").write_text(SWEEP.format(books=books))
    argv = ["sweep", str(tmp_path / "s.yaml"), "--model", str(tiny_checkpoint), "--out", str(tmp_path / "out")]
    assert run_cli(main, argv) == 0
    out = tmp_path / "out"
    for label in ("none", "snapkv_w4_c16_k5_avgpool"):
        records = read_jsonl(out / label / "recall.jsonl")
        assert [r["example"]["depth"] for r in records] == [0.2, 0.8] and all(r["task"] == "recall" for r in records)
        assert all("retained" in r for r in read_jsonl(out / label / "ppl.jsonl"))
    assert all(r["retained"] in (1.0, None) for r in read_jsonl(out / "none" / "recall.jsonl"))
    for task in ("needle", "continuation"):
        assert [r["task"] for r in read_jsonl(out / "snapkv_w4_c16_k5_avgpool" / f"{task}.jsonl")] == [task]
    settings = json.loads((out / "sweep.json").read_text())["settings"]
    assert settings["tasks"]["recall"]["trials"] == 1 and settings["tasks"]["ppl"] == {"short_context": 8}
    report = (out / "report.md").read_text()
    assert "retained per task" in report
    assert ("| config | KV kept per head | KV MiB held | PPL | PPL key tokens | recall | needle | continuation |"
            in report)
    assert "**needle (passkey)**" in report and "ROUGE-L F" in report  # the raw metrics, as the tasks declare them
    for plot in ("retained_vs_budget", "recall_heatmap", "needle_passkey_heatmap"):
        assert (out / "plots" / f"{plot}.png").is_file() and f"plots/{plot}.png" in report

    def fail(*args, **kwargs):
        raise AssertionError("a complete task was scored again")

    monkeypatch.setattr(eval.units, "example_records", fail)
    capsys.readouterr()
    assert run_cli(main, argv) == 0
    assert "2 already complete" in capsys.readouterr().err
    monkeypatch.undo()
    assert json.loads((out / "sweep.json").read_text())["task_examples"] == dict(recall=2, needle=1, continuation=1)
    lines = (out / "none" / "recall.jsonl").read_text().splitlines()
    (out / "none" / "recall.jsonl").write_text(lines[0] + "\n")  # an interrupted run: the report says so
    from eval.report import write_report

    assert "| none | recall: 1 of 2 examples |" in write_report(out).read_text()
    # another setting of a task already in the folder is refused
    (tmp_path / "s2.yaml").write_text(SWEEP.format(books=books).replace("passage_tokens: 16", "passage_tokens: 12"))
    assert run_cli(main, ["sweep", str(tmp_path / "s2.yaml"), "--model", str(tiny_checkpoint), "--out",
                          str(out)]) == 2
    assert "holds task recall with other settings" in capsys.readouterr().err


def test_task_command_runs_on_text_the_model_samples_without_data(tiny_checkpoint, tmp_path, capsys):
    argv = ["task", "recall", "--model", str(tiny_checkpoint), "--set", "contexts=[64]", "--set", "depths=[0.5]",
            "--set", "trials=1", "--set", "passage_tokens=16", "--set", "cue_tokens=4", "--compressor", "knorm",
            "--compression-ratio", "0.5", "--out", str(tmp_path / "t")]
    assert run_cli(main, argv) == 0
    captured = capsys.readouterr()
    assert "sampled from the model" in captured.err and "| knorm_r0.5 |" in captured.out
    (record,) = read_jsonl(tmp_path / "t" / "knorm_r0.5" / "recall.jsonl")
    assert record["example"] == dict(context=64, depth=0.5, trial=0) and record["haystack"].startswith("sampled-")
    for bad, message in (("trials", "--set takes SETTING=VALUE"), ("trial=2", "no setting 'trial'"),
                         ("depths=[0.5", "not valid YAML")):
        assert run_cli(main, ["task", "recall", "--model", str(tiny_checkpoint), "--set", bad, "--out",
                              str(tmp_path / "bad")]) == 2
        assert message in capsys.readouterr().err


def test_tasks_are_added_to_a_folder_that_holds_ppl_only(tiny_checkpoint, tmp_path, monkeypatch):
    books = tmp_path / "books"
    books.mkdir()
    (books / "a.txt").write_text(" ".join(["the quick brown fox jumps over a lazy dog"] * 60))
    full = SWEEP.format(books=books)
    ppl_only = "\n".join(line for line in full.splitlines() if not line.lstrip().startswith(("- recall", "- needle",
                                                                                           "- continuation")))
    (tmp_path / "ppl.yaml").write_text(ppl_only)
    (tmp_path / "all.yaml").write_text(full)
    out = tmp_path / "out"
    assert run_cli(main, ["sweep", str(tmp_path / "ppl.yaml"), "--model", str(tiny_checkpoint), "--out", str(out)]) == 0
    assert not (out / "none" / "recall.jsonl").exists()

    def fail(*args, **kwargs):
        raise AssertionError("PPL was computed again")

    monkeypatch.setattr(eval.ppl, "sliding_window_scores", fail)
    assert run_cli(main, ["sweep", str(tmp_path / "all.yaml"), "--model", str(tiny_checkpoint), "--out", str(out)]) == 0
    assert len(read_jsonl(out / "none" / "recall.jsonl")) == 2
    assert set(json.loads((out / "sweep.json").read_text())["settings"]["tasks"]) == {"ppl", "recall", "needle",
                                                                                      "continuation"}
