"""`python -m eval sweep` and the report: grid expansion, skipped combinations, a folder per configuration,
resume, per-token NLLs equal to a config run alone, the report's plots and seed-claims table, bad configs."""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import eval.ppl
import eval.sweep
from eval.__main__ import main
from eval.data import load_books, tokenized_books
from eval.grid import ConfigError, expand, parse_spec
from eval.ppl import sliding_window_nll
from eval.report import write_report
from eval.results import append_jsonl, read_jsonl
from minipythia import KnormPress, Pythia, PythiaConfig, SnapKV, Tokenizer
from minipythia.cli import run_cli

REPO = Path(__file__).resolve().parents[1]
WORDS = "the quick brown fox jumps over a lazy dog while seven old men read long books by the sea".split()


def spec_of(text: str):
    return parse_spec(text, Path("test.yaml"))


# --- the grid --------------------------------------------------------------------------------------------------


SIX_LAYERS = PythiaConfig(num_hidden_layers=6)


def test_grid_is_the_cartesian_product_of_each_entry():
    spec = spec_of("""
policies:
  - {compressor: none}
  - {compressor: snapkv, window_size: [16, 32, 64], max_capacity_prompt: [256, 512, 1024], kernel_size: [3, 5, 7],
     pooling: [avgpool, maxpool]}
  - {compressor: knorm, compression_ratio: [0.5, 0.75]}
""")
    grid = expand(spec.policies, SIX_LAYERS)
    labels = [c.label for c in grid.configs]
    assert len(labels) == 1 + 3 * 3 * 3 * 2 + 2 and len(set(labels)) == len(labels) and grid.skipped == []
    assert labels[:3] == ["none", "snapkv_w16_c256_k3_avgpool", "snapkv_w16_c256_k3_maxpool"]
    assert labels[-2:] == ["knorm_r0.5", "knorm_r0.75"] and "snapkv_w64_c1024_k7_maxpool" in labels
    # the order is the YAML's: the first axis varies slowest
    assert labels.index("snapkv_w16_c1024_k7_maxpool") < labels.index("snapkv_w32_c256_k3_avgpool")


def test_settings_are_keyword_arguments_of_any_registered_policy():
    spec = spec_of("""
policies:
  - {compressor: knorm, compression_ratio: 1, skip_layers: [0, 1]}        # a flat list: one value
  - {compressor: knorm, compression_ratio: 0.5, skip_layers: [[], [0]]}   # a list of lists: an axis
  - {compressor: pyramidkv, max_capacity_prompt: 64, window_size: 8}
""")
    grid = expand(spec.policies, SIX_LAYERS)
    assert [c.label for c in grid.configs] == ["knorm_r0.5", "knorm_r0.5_skip0", "pyramidkv_w8_c64_k5_avgpool_beta20_layers6"]
    # ratio 1 is rejected by KnormPress itself (it allows [0, 1)): skipped, with its reason
    assert len(grid.skipped) == 1 and "compression_ratio" in grid.skipped[0]["reason"]
    assert grid.skipped[0]["settings"] == {"compression_ratio": 1.0, "skip_layers": [0, 1]}
    assert isinstance(grid.configs[0].compression_ratio, float) and grid.configs[1].skip_layers == (0,)
    assert grid.configs[2].num_layers == 6  # filled from the model


def test_invalid_combinations_are_skipped_with_the_reason():
    spec = spec_of("""
policies:
  - {compressor: snapkv, window_size: [32, 64], max_capacity_prompt: [64, 512], kernel_size: [4, 5]}
  - {compressor: knorm, compression_ratio: [0.5, 0.5]}
""")
    grid = expand(spec.policies, SIX_LAYERS)
    assert [c.label for c in grid.configs] == ["snapkv_w32_c64_k5_avgpool", "snapkv_w32_c512_k5_avgpool",
                                               "snapkv_w64_c512_k5_avgpool", "knorm_r0.5"]
    reasons = {json.dumps(s["settings"]): s["reason"] for s in grid.skipped}
    assert len(grid.skipped) == 6
    assert "must be smaller than max_capacity_prompt" in reasons[json.dumps(
        {"window_size": 64, "max_capacity_prompt": 64, "kernel_size": 5})]
    assert "kernel_size must be a positive odd number" in reasons[json.dumps(
        {"window_size": 32, "max_capacity_prompt": 512, "kernel_size": 4})]
    assert "same configuration as an earlier entry" in grid.skipped[-1]["reason"]


@pytest.mark.parametrize("text, message", [
    ("policies: [{compressor: none}\n", "invalid YAML at line"),
    ("policies: [{compressor: nonesuch}]", "unknown compressor 'nonesuch'; registered: none"),
    ("policies: [{compressor: snapkv, window: 4}]", "snapkv has no setting 'window'; its settings: window_size"),
    ("policies: [{compressor: snapkv, window_size: '32'}]", "snapkv.window_size must be an int"),
    ("policies: [{compressor: snapkv, window_size: []}]", "empty list"),
    ("policies: []", "policies must be a non-empty list"),
    ("stride: 0\npolicies: [{compressor: none}]", "stride must be int >= 1"),
    ("ctx_len: 64\nstride: 65\npolicies: [{compressor: none}]", "stride (65) must be <= ctx_len (64)"),
    ("speed: {prompt_lengths: [512], new_tokens: 2}\npolicies: [{compressor: none}]", "speed.new_tokens"),
    ("speed: {lengths: [512]}\npolicies: [{compressor: none}]", "unknown speed key(s) 'lengths'"),
    ("ctx: 64\npolicies: [{compressor: none}]", "unknown key(s) 'ctx'"),
    ("- just a list", "expected a mapping"),
])
def test_bad_config_is_one_error_line_and_exit_code_2(tmp_path, capsys, text, message):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError):
        parse_spec(text, path)
    assert run_cli(main, ["sweep", str(path), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error:") and message in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "out").exists()


def test_a_shipped_config_by_name_from_any_directory(tmp_path, monkeypatch, capsys):
    """`sweep compact` (or compact.yaml) is the shipped file wherever the command runs; a file of that name in
    the working directory comes first; an unknown name is one line listing the shipped ones."""
    from eval.grid import SHIPPED_CONFIGS, load_spec

    monkeypatch.chdir(tmp_path)
    for name in ("compact", "compact.yaml"):
        assert load_spec(name).path == SHIPPED_CONFIGS / "compact.yaml"
    (tmp_path / "compact.yaml").write_text("policies: [{compressor: none}]")
    assert load_spec("compact.yaml").path == Path("compact.yaml")
    assert run_cli(main, ["sweep", "nonesuch", "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip()
    assert "sweep config 'nonesuch' does not exist" in err and "compact-all, full" in err and "\n" not in err


def test_bad_config_exit_code_from_the_command_line(tmp_path):
    (tmp_path / "bad.yaml").write_text("policies:\n  - {compressor: snapkv\n")
    r = subprocess.run([sys.executable, "-m", "eval", "sweep", str(tmp_path / "bad.yaml")], cwd=REPO,
                       capture_output=True, text=True, timeout=300, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert r.returncode == 2 and r.stderr.startswith("error:") and len(r.stderr.strip().splitlines()) == 1
    assert "bad.yaml: invalid YAML" in r.stderr and "Traceback" not in r.stderr


# --- a sweep on the tiny checkpoint ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def books_dir(tmp_path_factory) -> Path:
    g = torch.Generator().manual_seed(2)
    directory = tmp_path_factory.mktemp("sweep-books")
    for name, sentences in (("alpha", 20), ("beta", 18)):
        text = "\n".join(" ".join(WORDS[j] for j in torch.randint(len(WORDS), (10,), generator=g)) + "."
                         for _ in range(sentences))
        (directory / f"{name}.txt").write_text(text)
    return directory


CONFIG = """
data: {books}
ctx_len: 48
stride: 16
max_tokens: 112
batch_size: 2
speed: {{prompt_lengths: [24, 48], new_tokens: 5, repeats: 1}}
policies:
  - {{compressor: none}}
  - {{compressor: knorm, compression_ratio: 0.5}}
  - {{compressor: snapkv, window_size: [4, 16], max_capacity_prompt: [16, 24]}}
"""
LABELS = ["none", "knorm_r0.5", "snapkv_w4_c16_k5_avgpool", "snapkv_w4_c24_k5_avgpool", "snapkv_w16_c24_k5_avgpool"]


@pytest.fixture(scope="module")
def swept(tiny_checkpoint, books_dir, tmp_path_factory):
    """One sweep (5 configurations in batches of 2, one combination skipped), with the per-token NLLs that
    sliding_window_scores returned, by (book, label)."""
    root = tmp_path_factory.mktemp("sweep")
    (root / "sweep.yaml").write_text(CONFIG.format(books=books_dir))
    nlls = {}
    real = eval.ppl.sliding_window_scores

    def spy(model, ids, ctx_len, stride, compressors, desc=None, seconds=None, short_context=None, batch_windows=1):
        results = real(model, ids, ctx_len, stride, compressors, desc, seconds, short_context, batch_windows)
        for c, scores in zip(compressors, results):
            nlls[(desc.split(" ")[0], c.label)] = scores.nll
        return results

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(eval.ppl, "sliding_window_scores", spy)
        assert run_cli(main, ["sweep", str(root / "sweep.yaml"), "--model", str(tiny_checkpoint),
                              "--out", str(root / "out")]) == 0
    return root, nlls


def test_a_folder_per_configuration_with_its_config_and_results(swept):
    root, _ = swept
    out = root / "out"
    summary = json.loads((out / "sweep.json").read_text())
    assert [c["label"] for c in summary["configs"]] == LABELS
    assert [(s["settings"], "must be smaller" in s["reason"]) for s in summary["skipped"]] == [
        ({"window_size": 16, "max_capacity_prompt": 16}, True)]
    for label in LABELS:
        config = json.loads((out / label / "config.json").read_text())
        assert config["label"] == label and config["sweep"]["ctx_len"] == 48 and config["window_prompt"] == 32
        ppl = read_jsonl(out / label / "ppl.jsonl")
        assert [r["book"] for r in ppl] == ["alpha", "beta"] and all(r["label"] == label for r in ppl)
        assert all(r["tokens"] == 111 and r["max_tokens"] == 112 for r in ppl)
        speed = read_jsonl(out / label / "speed.jsonl")
        assert [r["prompt_len"] for r in speed] == [24, 48]
        # compressed rows carry the no-compression row measured in the same run
        assert all(("reference" in r) == (label != "none") for r in speed)
    assert json.loads((out / "knorm_r0.5" / "config.json").read_text())["kept_per_head"] == 16
    assert json.loads((out / "snapkv_w4_c24_k5_avgpool" / "config.json").read_text())["kept_per_head"] == 24
    snap = read_jsonl(out / "snapkv_w4_c16_k5_avgpool" / "speed.jsonl")
    assert [r["kept_after_prefill"] for r in snap] == [16, 16]
    assert snap[1]["reference"]["kept_after_prefill"] == 48
    # each repeat's figures, for this row and for its reference measured in the same repeats (paired ratios)
    assert len(snap[1]["tpot_runs_ms"]) == len(snap[1]["reference"]["tpot_runs_ms"]) == 1


def test_per_token_nlls_in_a_sweep_equal_running_the_config_alone(swept, tiny_checkpoint, books_dir):
    root, nlls = swept
    model = Pythia.from_pretrained(tiny_checkpoint).for_inference()  # as the sweep loads it
    books = tokenized_books(load_books(str(books_dir)), Tokenizer.from_pretrained(tiny_checkpoint), 112)
    for config in (KnormPress(0.5), SnapKV(window_size=4, max_capacity_prompt=16)):
        for name, _, ids in books:
            alone = sliding_window_nll(model, ids, 48, 16, config)
            assert torch.equal(nlls[(name, config.label)], alone), (name, config.label)
            record = next(r for r in read_jsonl(root / "out" / config.label / "ppl.jsonl") if r["book"] == name)
            assert record["nll_sum"] == alone.double().sum().item()
    # and the compression did something: the configs differ from none
    assert not torch.equal(nlls[("alpha", "knorm_r0.5")], nlls[("alpha", "none")])


def test_rerun_skips_complete_folders_and_resumes_an_interrupted_one(swept, tiny_checkpoint, tmp_path, capsys,
                                                                     monkeypatch):
    root, _ = swept
    out = tmp_path / "out"
    shutil.copytree(root / "out", out)
    argv = ["sweep", str(root / "sweep.yaml"), "--model", str(tiny_checkpoint), "--out", str(out)]
    files = sorted(out.glob("*/*.jsonl"))
    stamps = {f: f.stat().st_mtime_ns for f in files}

    def fail(*args, **kwargs):
        raise AssertionError("a complete configuration was computed again")

    monkeypatch.setattr(eval.ppl, "sliding_window_scores", fail)
    monkeypatch.setattr(eval.sweep, "measure", fail)
    assert run_cli(main, argv) == 0
    assert "5 already complete" in capsys.readouterr().err
    assert {f: f.stat().st_mtime_ns for f in files} == stamps
    monkeypatch.undo()

    # An interruption: beta's PPL of one configuration and its speed for the longer prompt are lost
    label = "snapkv_w4_c24_k5_avgpool"
    for name in ("ppl.jsonl", "speed.jsonl"):
        lines = (out / label / name).read_text().splitlines()
        (out / label / name).write_text(lines[0] + "\n" + lines[1][:20])  # the last line cut mid-write
    runs = []
    real_nlls, real_measure = eval.ppl.sliding_window_scores, eval.sweep.measure
    monkeypatch.setattr(eval.ppl, "sliding_window_scores",
                        lambda model, ids, ctx, stride, cs, *a, **k: runs.append([c.label for c in cs])
                        or real_nlls(model, ids, ctx, stride, cs, *a, **k))
    monkeypatch.setattr(eval.sweep, "measure", lambda model, prompts, cs, *a, **k: runs.append([c.label for c in cs])
                        or real_measure(model, prompts, cs, *a, **k))
    assert run_cli(main, argv) == 0
    assert runs == [[label], ["none", label]]  # beta's PPL, then speed with its reference
    assert [r["book"] for r in read_jsonl(out / label / "ppl.jsonl")] == ["alpha", "beta"]
    speed = read_jsonl(out / label / "speed.jsonl")
    assert [r["prompt_len"] for r in speed] == [24, 24, 48] and speed[0]["run"] != speed[1]["run"]
    assert len(read_jsonl(out / "none" / "speed.jsonl")) == 2  # the reference is not written as none's result
    assert "- run 2:" in (out / "report.md").read_text()


def test_rerun_with_other_settings_is_refused(swept, tiny_checkpoint, tmp_path, capsys):
    root, _ = swept
    out = tmp_path / "out"
    shutil.copytree(root / "out", out)
    (tmp_path / "other.yaml").write_text((root / "sweep.yaml").read_text().replace("stride: 16", "stride: 24"))
    argv = ["sweep", str(tmp_path / "other.yaml"), "--model", str(tiny_checkpoint), "--out", str(out)]
    assert run_cli(main, argv) == 2
    err = capsys.readouterr().err
    assert "other settings (stride: 16 there, 24 now)" in err and len(err.strip().splitlines()) == 1


def test_report_of_a_sweep(swept, tiny_checkpoint):
    root, _ = swept
    out = root / "out"
    report = (out / "report.md").read_text()
    for png in ("ppl_vs_budget", "speed_vs_prompt", "overhead_vs_prompt"):
        assert (out / "plots" / f"{png}.png").stat().st_size > 10_000
        assert f"(plots/{png}.png)" in report
    assert f"model: `{tiny_checkpoint}`" in report
    assert "2 book(s) (alpha, beta) from" in report and "first 112 tokens of each" in report
    assert "| snapkv | {\"window_size\": 16, \"max_capacity_prompt\": 16} | window_size (16) must be smaller" in report
    for label in LABELS:
        assert f"| {label} | 2 | 222 |" in report  # PPL table: books, scored tokens
    assert "## Seed-study claims vs measured" in report
    assert "Not measured: these results have no SnapKV configuration with max_capacity_prompt 512" in report
    (out / "report.md").unlink()
    assert run_cli(main, ["report", str(out)]) == 0 and (out / "report.md").read_text() == report


def test_results_csv_is_one_tidy_table_of_the_records(swept):
    """results.csv: PPL per book and overall from the NLL sums of ppl.jsonl, the change vs none, and the speed
    rows of speed.jsonl, a row per configuration x metric (x book, x prompt length)."""
    import csv
    import math

    out = swept[0] / "out"
    rows = list(csv.DictReader((out / "results.csv").open()))
    assert list(rows[0]) == ["model", "revision", "config", "compressor", "kept_per_head", "kv_bytes", "metric",
                             "book", "prompt_len", "value"]
    assert list(dict.fromkeys(r["config"] for r in rows)) == LABELS

    def value(config, metric, book="", prompt_len=""):
        found = [r for r in rows if (r["config"], r["metric"], r["book"], r["prompt_len"]) ==
                 (config, metric, book, prompt_len)]
        assert len(found) == 1, (config, metric, book, prompt_len)
        return float(found[0]["value"])

    records = {label: read_jsonl(out / label / "ppl.jsonl") for label in LABELS}
    for label in LABELS:
        nll, tokens = sum(r["nll_sum"] for r in records[label]), sum(r["tokens"] for r in records[label])
        assert value(label, "ppl") == pytest.approx(math.exp(nll / tokens), rel=1e-12)
        for r in records[label]:
            assert value(label, "ppl", book=r["book"]) == pytest.approx(math.exp(r["nll_sum"] / r["tokens"]))
        for r in read_jsonl(out / label / "speed.jsonl"):
            assert value(label, "tpot_ms", prompt_len=str(r["prompt_len"])) == pytest.approx(r["tpot_ms"])
    assert value("knorm_r0.5", "ppl_vs_none") == pytest.approx(value("knorm_r0.5", "ppl") / value("none", "ppl") - 1)
    assert not [r for r in rows if r["config"] == "none" and r["metric"] == "ppl_vs_none"]
    assert {float(r["kept_per_head"]) for r in rows if r["config"] == "snapkv_w4_c24_k5_avgpool"} == {24}


# --- the seed-claims table from known results ------------------------------------------------------------------


def _speed_row(label, compressor, settings, prompt_len, ttft, compress, tpot, kv, kept, reference=None):
    row = dict(engine="minipythia", label=label, compressor=compressor, settings=settings, prompt_len=prompt_len,
               ttft_ms=ttft, compress_ms=compress, tpot_ms=tpot, tok_s=1000 / tpot, kv_prefill_bytes=4 * kept,
               kv_compressed_bytes=kv, kv_end_bytes=kv + 1024, kept_after_prefill=kept, peak_rss_mib=100.0,
               model="weights/tiny-pg19", dtype="float32", new_tokens=32, repeats=3, threads=2, run="r1",
               prompt_source="text: the first 3000 tokens of 10146")
    if reference:
        row["reference"] = reference
    return row


def _ppl_record(label, compressor, settings, book, nll_sum, kept):
    return dict(book=book, source=f"pg19-test/{book}.txt", model="weights/tiny-pg19", revision=None, dtype="float32",
                ctx_len=2048, stride=512, max_tokens=8192, compressor=compressor, settings=settings, label=label,
                tokens=1000, nll_sum=nll_sum, ppl=math.exp(nll_sum / 1000), window_prompt=1536, kept_per_head=kept)


def write_sweep_results(out: Path, with_3000: bool):
    """A sweep's results with known numbers: none and SnapKV C512 (W32 k5 avgpool) at 2048 (and 3000) tokens."""
    snap = dict(window_size=32, max_capacity_prompt=512, kernel_size=5, pooling="avgpool")
    configs = [("none", "none", {}), ("snapkv_w32_c512_k5_avgpool", "snapkv", snap)]
    lengths = [2048, 3000] if with_3000 else [2048]
    out.mkdir()
    (out / "sweep.json").write_text(json.dumps(dict(
        settings=dict(ctx_len=2048, stride=512, books=[["a", "pg19-test/a.txt", 8192]],
                      speed=dict(prompt_lengths=lengths, new_tokens=32, repeats=3)),
        config_file="eval/configs/compact.yaml", config_text="policies: []\n", model="weights/tiny-pg19",
        revision=None, dtype="float32", checkpoint="weights/tiny-pg19", parameters=2.5e6,
        architecture=dict(layers=4, heads=4, hidden=192, vocab=8192, trained_positions=1024),
        data="1 book(s) (a) from pg19-test, first 8192 tokens of each", machine="test", skipped=[],
        configs=[dict(label=label, folder=label, compressor=name, settings=settings) for label, name, settings in configs],
        runs=[dict(command="python -m eval sweep", started="now", wall_seconds=1.0, configs_run=2)])))
    for label, name, settings in configs:
        (out / label).mkdir()
        kept = 1536 if name == "none" else 512
        append_jsonl(out / label / "ppl.jsonl", _ppl_record(label, name, settings, "a", 1000 * math.log(
            20.0 if name == "none" else 21.0), kept))
    for n in lengths:
        kv_full = 48 * n
        ref = _speed_row("none", "none", {}, n, 100.0, 0.0, 10.0, kv_full, n)
        append_jsonl(out / "none" / "speed.jsonl", ref)
        append_jsonl(out / "snapkv_w32_c512_k5_avgpool" / "speed.jsonl",
                     _speed_row("snapkv_w32_c512_k5_avgpool", "snapkv", snap, n, 108.0, 8.0, 8.0, 48 * 512, 512,
                                reference={k: ref[k] for k in eval.sweep.REFERENCE_KEYS}))


def claims_rows(report: str) -> dict[str, list[str]]:
    section = report.split("## Seed-study claims vs measured")[1]
    rows = [line.strip("|").split(" | ") for line in section.splitlines() if line.startswith("| ")]
    return {r[0].strip(): [x.strip() for x in r[1:]] for r in rows[1:]}


def test_seed_claims_table_shows_the_measured_values(tmp_path):
    write_sweep_results(tmp_path / "r", with_3000=True)
    report = write_report(tmp_path / "r").read_text()
    rows = claims_rows(report)
    assert rows["KV memory"][0] == "-83%"
    assert rows["KV memory"][1].startswith("-75.0% (0.02 vs 0.09 MiB after compression")
    assert rows["KV memory"][2].startswith(f"{100 * (512 / 3000 - 1):+.1f}%")
    assert rows["generation (decode) speed"][1:] == ["1.25x (TPOT 8.00 vs 10.00 ms)"] * 2
    assert rows["PPL"][1] == "+5.00% (21.000 vs 20.000; PPL windows compress 1536 -> 512)"
    assert rows["PPL"][2].startswith("not measured")
    assert rows["compression overhead"][1].startswith("8.0% of the prefill forward (8.0 of 100.0 ms; 7.4% of TTFT)")
    assert "`snapkv_w32_c512_k5_avgpool` against no compression" in report and "`weights/tiny-pg19`" in report
    assert "leaves out the MLP and the 50304x512 LM head" in report and "This model's LM head is 8192x192." in report
    for png in ("ppl_vs_budget", "speed_vs_prompt", "overhead_vs_prompt"):
        assert (tmp_path / "r" / "plots" / f"{png}.png").is_file()


def test_seed_claims_say_not_measured_without_a_3000_token_prompt(tmp_path):
    write_sweep_results(tmp_path / "r", with_3000=False)
    rows = claims_rows(write_report(tmp_path / "r").read_text())
    assert rows["KV memory"][1].startswith("-75.0%")
    for claim in ("KV memory", "generation (decode) speed", "compression overhead"):
        assert rows[claim][2] == "not measured (no 3000-token prompt in the speed part)"


def test_sweep_without_data_still_measures_speed(tiny_checkpoint, tmp_path, monkeypatch):
    # No data at all: the default PG-19 cannot be had (a --data path that does not exist is an error instead:
    # tests/test_hostile_inputs.py).
    monkeypatch.delenv("PG19_DIR", raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", True)
    (tmp_path / "s.yaml").write_text(f"""
data: pg19
speed: {{prompt_lengths: [24], new_tokens: 5, repeats: 1}}
policies: [{{compressor: none}}, {{compressor: snapkv, window_size: 4, max_capacity_prompt: 16}}]
""")
    assert run_cli(main, ["sweep", str(tmp_path / "s.yaml"), "--model", str(tiny_checkpoint),
                          "--out", str(tmp_path / "out")]) == 0
    report = (tmp_path / "out" / "report.md").read_text()
    assert "No PPL" in report and "--data DIR" in report and "random token ids" in report
    assert len(read_jsonl(tmp_path / "out" / "snapkv_w4_c16_k5_avgpool" / "speed.jsonl")) == 1
    assert not (tmp_path / "out" / "none" / "ppl.jsonl").exists()
    (tmp_path / "s.yaml").write_text("data: pg19\npolicies: [{compressor: none}]\n")
    assert run_cli(main, ["sweep", str(tmp_path / "s.yaml"), "--model", str(tiny_checkpoint),
                          "--out", str(tmp_path / "out2")]) == 2  # nothing to run without data or speed


def test_report_moves_an_older_flat_folder_into_the_sweep_layout(tmp_path):
    """`python -m eval suite` / `ppl` / `speed` used to write every record into DIR/ppl.jsonl and
    DIR/speed.jsonl; `report` moves such a folder into the layout it reads, losing nothing."""
    out = tmp_path / "old"
    out.mkdir()
    snap = dict(window_size=32, max_capacity_prompt=512, kernel_size=5, pooling="avgpool")
    label = "snapkv_w32_c512_k5_avgpool"
    for name, nll in (("none", 20.0), ("snapkv", 21.0)):
        append_jsonl(out / "ppl.jsonl", _ppl_record("none" if name == "none" else label, name,
                                                    {} if name == "none" else snap, "a", 1000 * math.log(nll),
                                                    1536 if name == "none" else 512))
    for n in (2048, 3000):  # a flat speed run: no `reference` in its rows, the run's none row is it
        append_jsonl(out / "speed.jsonl", _speed_row("none", "none", {}, n, 100.0, 0.0, 10.0, 48 * n, n))
        append_jsonl(out / "speed.jsonl", _speed_row(label, "snapkv", snap, n, 108.0, 8.0, 8.0, 48 * 512, 512))
    (out / "suite.json").write_text(json.dumps(dict(
        model="weights/tiny-pg19", dtype="float32", parameters=2.5e6, data="1 book", machine="test",
        runs=[dict(command="python -m eval suite", started="then", wall_seconds=3.0, ppl_seconds=2.0,
                   speed_seconds=1.0)])))
    report = write_report(out).read_text()
    assert sorted(p.name for p in out.iterdir() if p.is_dir()) == sorted(["none", label, "plots"])
    assert {p.name for p in out.glob("*.flat")} == {"ppl.jsonl.flat", "speed.jsonl.flat", "suite.json.flat"}
    assert len(read_jsonl(out / label / "ppl.jsonl")) == 1 and len(read_jsonl(out / label / "speed.jsonl")) == 2
    assert read_jsonl(out / label / "speed.jsonl")[0]["reference"]["tpot_ms"] == 10.0
    assert f"| {label} | 1 | 1000 |" in report and "+5.00%" in report
    assert claims_rows(report)["generation (decode) speed"][1:] == ["1.25x (TPOT 8.00 vs 10.00 ms)"] * 2
    assert write_report(out).read_text() == report  # a second report reads the moved folder as it is
