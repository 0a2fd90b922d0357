"""The eval package: sliding-window NLLs against the Hugging Face procedure, compressors in the loop,
JSONL results with resume, and the `python -m eval` commands on a tiny random checkpoint."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from eval.__main__ import main
from eval.data import DataError, load_books, tokenized_books
from eval.ppl import book_records, ppl_base, sliding_window_nll, sliding_window_nlls, windows
from eval.results import append_jsonl, read_jsonl
from minipythia import KnormPress, NoCompression, Pythia, SnapKV, Tokenizer
from minipythia.cli import run_cli

from conftest import pg19_dir, pythia_tokenizer_path

REPO = Path(__file__).resolve().parents[1]
PPL_FIELDS = {"book", "model", "dtype", "compressor", "settings", "label", "ctx_len", "stride", "max_tokens",
              "tokens", "nll_sum", "ppl"}


def hf_sliding_window_nll(hf, ids: torch.Tensor, ctx_len: int, stride: int) -> torch.Tensor:
    """The loop of HF's "Perplexity of fixed-length models" page, kept per token instead of averaged."""
    nlls, prev_end = [], 0
    for begin in range(0, ids.numel(), stride):
        end = min(begin + ctx_len, ids.numel())
        trg_len = end - prev_end
        input_ids = ids[begin:end].unsqueeze(0)
        target_ids = input_ids.clone()
        target_ids[:, :-trg_len] = -100
        with torch.no_grad():
            out = hf(input_ids, labels=target_ids)
        labels = target_ids[0, 1:]
        per_token = F.cross_entropy(out.logits[0, :-1].float(), labels, ignore_index=-100, reduction="none")
        per_token = per_token[labels != -100]
        if per_token.numel():
            assert abs(per_token.mean() - out.loss) < 1e-5  # the same tokens HF's own loss averages
        nlls.append(per_token)
        prev_end = end
        if end == ids.numel():
            break
    return torch.cat(nlls)


@pytest.fixture(scope="module")
def tiny(tiny_checkpoint):
    return Pythia.from_pretrained(tiny_checkpoint).for_inference()


def ids_of(n: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 512, (n,), generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def books_dir(tmp_path_factory) -> Path:
    """Three .txt books of generated sentences (a few hundred tiny-tokenizer tokens each)."""
    words = "the quick brown fox jumps over a lazy dog while seven old men read long books by the sea".split()
    g = torch.Generator().manual_seed(1)
    directory = tmp_path_factory.mktemp("books")
    for name, sentences in (("alpha", 40), ("beta", 30), ("gamma", 25)):
        text = "\n".join(" ".join(words[j] for j in torch.randint(len(words), (10,), generator=g)) + "."
                         for _ in range(sentences))
        (directory / f"{name}.txt").write_text(text)
    (directory / "notes.md").write_text("not a book")
    return directory


def run_eval(*args, env=None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "eval", *map(str, args)], cwd=REPO, capture_output=True, text=True,
                          env={**os.environ, **(env or {})}, timeout=300)


# --- the sliding-window procedure -----------------------------------------------------------------------------


@pytest.mark.parametrize("n, ctx_len, stride",
                         [(200, 64, 16), (203, 64, 16), (150, 64, 64), (131, 50, 7), (40, 64, 16), (129, 64, 64)])
def test_windows_score_each_token_once(n, ctx_len, stride):
    spans = list(windows(n, ctx_len, stride))
    assert spans[0][:1] == (0,) and spans[-1][1] == n
    targets = [t for begin, end, prompt in spans for t in range(begin + max(prompt, 1), end)]
    expected_unscored = sum(1 for _, _, prompt in spans if prompt == 0)  # HF's shift drops their first token
    assert targets == sorted(set(targets)) and len(targets) == n - expected_unscored


@pytest.mark.parametrize("n, ctx_len, stride", [(203, 64, 16), (150, 64, 64), (131, 50, 7), (129, 64, 64)])
def test_nll_matches_hf_sliding_window(tiny_hf_and_checkpoint, n, ctx_len, stride):
    """THE parity: per-token NLLs equal those of transformers running HF's loop on the same weights."""
    hf, checkpoint = tiny_hf_and_checkpoint
    model = Pythia.from_pretrained(checkpoint).for_inference()
    ids = ids_of(n)
    ours = sliding_window_nll(model, ids, ctx_len, stride)
    reference = hf_sliding_window_nll(hf, ids, ctx_len, stride)
    assert ours.shape == reference.shape
    assert (ours - reference).abs().max() <= 1e-4
    assert ours.dtype == torch.float32


@pytest.mark.parametrize("compressor", [KnormPress(0.0), SnapKV(window_size=8, max_capacity_prompt=49),
                                        SnapKV(window_size=8, max_capacity_prompt=48)])
def test_compressor_that_keeps_everything_changes_nothing(tiny, compressor):
    # Prompts are ctx_len - stride = 48 entries: SnapKV with C=48 runs its selection but keeps all 48.
    ids = ids_of(203)
    assert torch.equal(sliding_window_nll(tiny, ids, 64, 16, compressor), sliding_window_nll(tiny, ids, 64, 16))


def test_compressor_changes_only_windows_whose_prompt_exceeds_capacity(tiny):
    ids = ids_of(203)
    none = sliding_window_nll(tiny, ids, 64, 16)
    snap = sliding_window_nll(tiny, ids, 64, 16, SnapKV(window_size=8, max_capacity_prompt=32))
    assert torch.equal(snap[:63], none[:63])  # the first window has no prompt
    for start in range(63, none.numel(), 16):
        # a window's first target comes from the prefill, which attends to the full KV
        assert snap[start] == none[start]
        assert not torch.equal(snap[start + 1 : start + 16], none[start + 1 : start + 16])
    # stride 40 leaves 24-token prompts, under the capacity: nothing is evicted
    assert torch.equal(sliding_window_nll(tiny, ids, 64, 40, SnapKV(window_size=8, max_capacity_prompt=32)),
                       sliding_window_nll(tiny, ids, 64, 40))


def test_shared_prefill_equals_separate_runs(tiny):
    ids = ids_of(203)
    configs = [NoCompression(), KnormPress(0.5), SnapKV(window_size=8, max_capacity_prompt=32, pooling="maxpool")]
    seconds = [0.0] * 3
    shared = sliding_window_nlls(tiny, ids, 64, 16, configs, seconds=seconds)
    for c, nll in zip(configs, shared):
        assert torch.equal(nll, sliding_window_nll(tiny, ids, 64, 16, c)), c.label
    assert all(s > 0 for s in seconds)


def test_configs_that_keep_the_same_entries_are_scored_once(tiny, monkeypatch):
    """SnapKV with C at or above the 48-entry prompts keeps everything, as none does: its targets are not run
    again, and its NLLs are still those of a separate run."""
    ids = ids_of(203)
    configs = [NoCompression(), SnapKV(window_size=8, max_capacity_prompt=48), KnormPress(0.5),
               SnapKV(window_size=8, max_capacity_prompt=64)]
    forwards = []
    real_forward = type(tiny).forward
    monkeypatch.setattr(type(tiny), "forward", lambda self, ids, **kw: forwards.append(ids.size(1)) or
                        real_forward(self, ids, **kw))
    shared = sliding_window_nlls(tiny, ids, 64, 16, configs)
    all_four = list(forwards)
    forwards.clear()
    sliding_window_nlls(tiny, ids, 64, 16, [configs[0], configs[2]])
    assert all_four == forwards  # the forwards of none and KnormPress alone: the two SnapKVs ran none
    monkeypatch.undo()
    for c, nll in zip(configs, shared):
        assert torch.equal(nll, sliding_window_nll(tiny, ids, 64, 16, c)), c.label


def test_window_arguments_are_checked(tiny):
    for ctx_len, stride in ((64, 65), (64, 0), (1, 1)):
        with pytest.raises(ValueError):
            sliding_window_nll(tiny, ids_of(100), ctx_len, stride)


# --- results, resume, data ------------------------------------------------------------------------------------


def test_book_records_hold_each_configs_ppl(tiny):
    meta = dict(model="tiny", revision=None, dtype="float32")
    base = ppl_base(meta, "window", 64, 32, None)
    for name, ids in (("a", ids_of(150, 1)), ("b", ids_of(100, 2))):
        records, seconds = book_records(tiny, name, f"{name}.txt", ids, [NoCompression(), KnormPress(0.5)], base, 64, 32)
        assert len(records) == len(seconds) == 2 and PPL_FIELDS <= set(records[0])
        assert records[0]["tokens"] == len(ids) - 1 and records[0]["settings"] == {}
        assert records[1]["settings"]["compression_ratio"] == 0.5 and records[1]["book"] == name
        assert records[0]["ppl"] == pytest.approx(math.exp(records[0]["nll_sum"] / records[0]["tokens"]))


def test_append_jsonl_roundtrip(tmp_path):
    append_jsonl(tmp_path / "x" / "r.jsonl", {"a": 1})
    append_jsonl(tmp_path / "x" / "r.jsonl", {"a": 2})
    assert read_jsonl(tmp_path / "x" / "r.jsonl") == [{"a": 1}, {"a": 2}] and read_jsonl(tmp_path / "none") == []


def test_load_books(books_dir, tiny_checkpoint):
    books = load_books([str(books_dir)])
    assert [b.name for b in books] == ["alpha", "beta", "gamma"]
    assert [b.name for b in load_books([str(books_dir)], books=2)] == ["alpha", "beta"]
    files = [str(books_dir / "gamma.txt"), str(books_dir / "alpha.txt")]
    assert [b.name for b in load_books(files)] == ["gamma", "alpha"]
    tokenized = tokenized_books(books, Tokenizer.from_pretrained(tiny_checkpoint), max_tokens=100)
    assert all(ids.numel() == 100 for _, _, ids in tokenized)
    with pytest.raises(DataError, match="does not exist"):
        load_books([str(books_dir / "missing")])
    with pytest.raises(DataError, match="no .txt books"):
        load_books([str(books_dir.parent)])


def test_pg19_offline_says_how_to_pass_a_directory(monkeypatch, books_dir):
    import datasets

    def offline(*args, **kwargs):
        raise ConnectionError("Couldn't reach 'emozilla/pg19-test' on the Hub (LocalEntryNotFoundError)")

    monkeypatch.delenv("PG19_DIR", raising=False)
    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(DataError) as e:
        load_books(["pg19"])
    assert "--data DIR" in str(e.value) and "PG19_DIR" in str(e.value) and "\n" not in str(e.value)
    monkeypatch.setenv("PG19_DIR", str(books_dir))
    assert len(load_books(["pg19"])) == 3


@pytest.fixture
def local_dataset(tmp_path):
    """A stand-in for a hub text dataset: a folder whose test split `datasets` reads from test.jsonl, rows of a
    `body` column as WikiText has them (headings, lines, empty rows). Nothing is downloaded."""
    import json

    rows = ["", " = A heading = \n", "", " the quick brown fox jumps over a lazy dog . \n", " seven old men read . \n"]
    folder = tmp_path / "dataset"
    folder.mkdir()
    (folder / "test.jsonl").write_text("".join(json.dumps({"body": r, "n": i}) + "\n" for i, r in enumerate(rows)))
    return folder, rows


def test_a_hub_text_dataset_by_name_and_column(local_dataset):
    """hf:NAME#COLUMN: each non-empty row of the test split a book, in order, named by its row; --books the first
    N rows; a column it lacks is one line naming its columns."""
    folder, rows = local_dataset
    books = load_books([f"hf:{folder}#body"])
    assert [b.text for b in books] == [r for r in rows if r] and [b.name for b in books] == ["test-1", "test-3",
                                                                                             "test-4"]
    assert [b.text for b in load_books([f"hf:{folder}#body"], books=2)] == [rows[1]]
    with pytest.raises(DataError, match=r"has no column 'text' \(its columns: body, n\)") as e:
        load_books([f"hf:{folder}"])
    assert "\n" not in str(e.value)


def test_wikitext_is_its_test_split_as_one_document(local_dataset, monkeypatch):
    """--data wikitext-2 reads its dataset's rows as one text joined by blank lines, whatever --books says; when
    it cannot be loaded (offline, nothing cached) the error is one line naming the dataset and the way out."""
    import eval.data

    folder, rows = local_dataset
    wikitext = eval.data.NAMED_DATA["wikitext-2"]
    assert (wikitext.name, wikitext.config, wikitext.column) == ("Salesforce/wikitext", "wikitext-2-raw-v1", "text")
    monkeypatch.setitem(eval.data.NAMED_DATA, "wikitext-2",
                        eval.data.HubText(str(folder), column="body", joined=True))
    for books in (None, 1):
        [book] = load_books(["wikitext-2"], books=books)
        assert book.text == "\n\n".join(rows) and book.name == "dataset"
    monkeypatch.setitem(eval.data.NAMED_DATA, "wikitext-2", wikitext)

    import datasets

    def offline(*args, **kwargs):
        raise ConnectionError("Couldn't reach 'Salesforce/wikitext' on the Hub (LocalEntryNotFoundError)")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(DataError, match="cannot load Salesforce/wikitext:wikitext-2-raw-v1 .*--data DIR") as e:
        load_books(["wikitext-2"])
    assert "\n" not in str(e.value) and "PG19_DIR" not in str(e.value)


@pytest.mark.skipif(pg19_dir() is None, reason="no local PG-19 books (../shared or $PG19_DIR)")
@pytest.mark.skipif(pythia_tokenizer_path() is None, reason="no GPT-NeoX-20B tokenizer.json")
def test_real_pg19_books_load_and_tokenize():
    books = load_books([str(pg19_dir())])
    assert len(books) >= 1
    tokenized = tokenized_books(books, Tokenizer(pythia_tokenizer_path()))
    assert all(ids.numel() > 50_000 for _, _, ids in tokenized), [(n, ids.numel()) for n, _, ids in tokenized]


# --- the command line -----------------------------------------------------------------------------------------


def test_ppl_cli_writes_the_sweep_layout_and_resumes(tiny_checkpoint, books_dir, tmp_path, capsys):
    args = ["ppl", "--model", tiny_checkpoint, "--data", books_dir, "--books", "2", "--max-tokens", "150",
            "--ctx-len", "64", "--stride", "32", "--out", tmp_path]
    r = run_eval(*args, "--compressor", "snapkv", "--window-size", "4", "--max-capacity-prompt", "16")
    assert r.returncode == 0, r.stderr
    folder = tmp_path / "snapkv_w4_c16_k5_avgpool"
    records = read_jsonl(folder / "ppl.jsonl")
    assert [(x["book"], x["label"], x["tokens"]) for x in records] == [("alpha", "snapkv_w4_c16_k5_avgpool", 149),
                                                                      ("beta", "snapkv_w4_c16_k5_avgpool", 149)]
    assert PPL_FIELDS <= set(records[0]) and records[0]["max_tokens"] == 150
    assert "| snapkv_w4_c16_k5_avgpool | 2 | 298 |" in r.stdout  # the summary table
    # the rerun in-process (same code path, without a second interpreter start)
    argv = [str(a) for a in args] + ["--compressor", "snapkv", "--window-size", "4", "--max-capacity-prompt", "16"]
    assert run_cli(main, argv) == 0
    assert "already complete" in capsys.readouterr().err and len(read_jsonl(folder / "ppl.jsonl")) == 2
    # Another compressor into the same folder: the folder keeps both, and its report shows both.
    assert run_cli(main, [str(a) for a in args] + ["--compressor", "knorm"]) == 0
    assert [c["label"] for c in json.loads((tmp_path / "sweep.json").read_text())["configs"]] == [
        "snapkv_w4_c16_k5_avgpool", "knorm_r0.5"]
    report = (tmp_path / "report.md").read_text()
    assert "| snapkv_w4_c16_k5_avgpool | 2 | 298 |" in report and "| knorm_r0.5 | 2 | 298 |" in report
    # The YAML kept with the results runs the same configuration as a sweep, into a folder of its own.
    text = json.loads((tmp_path / "sweep.json").read_text())["config_text"]
    (tmp_path / "same.yaml").write_text(text)
    assert run_cli(main, ["sweep", str(tmp_path / "same.yaml"), "--out", str(tmp_path / "again")]) == 0
    assert read_jsonl(tmp_path / "again" / "knorm_r0.5" / "ppl.jsonl")[0]["nll_sum"] == \
        read_jsonl(tmp_path / "knorm_r0.5" / "ppl.jsonl")[0]["nll_sum"]


def test_speed_cli_with_hf(tiny_checkpoint, books_dir, tmp_path):
    r = run_eval("speed", "--model", tiny_checkpoint, "--prompt-lens", "32,64", "--new-tokens", "6", "--repeats", "1",
                 "--compressor", "snapkv", "--window-size", "4", "--max-capacity-prompt", "16", "--data", books_dir,
                 "--hf", "--out", tmp_path)
    assert r.returncode == 0, r.stderr
    rows = read_jsonl(tmp_path / "none" / "speed.jsonl") + read_jsonl(tmp_path / "snapkv_w4_c16_k5_avgpool" /
                                                                      "speed.jsonl")
    assert [(x["engine"], x["label"], x["prompt_len"]) for x in rows] == [
        ("minipythia", "none", 32), ("minipythia", "none", 64),
        ("transformers", "none", 32), ("transformers", "none", 64),
        ("minipythia", "snapkv_w4_c16_k5_avgpool", 32), ("minipythia", "snapkv_w4_c16_k5_avgpool", 64)]
    none, snap = rows[1], rows[5]
    assert snap["reference"]["kv_prefill_bytes"] == none["kv_prefill_bytes"]
    assert snap["kv_prefill_bytes"] == none["kv_prefill_bytes"] == none["kv_compressed_bytes"]
    assert snap["kv_compressed_bytes"] < snap["kv_prefill_bytes"]
    assert snap["kept_after_prefill"] == 16 and none["kept_after_prefill"] == 64 and snap["compress_ms"] > 0
    assert snap["kv_end_bytes"] > snap["kv_compressed_bytes"]
    assert all(x["ttft_ms"] > 0 and x["tpot_ms"] > 0 and len(x["tokens"]) == 6 for x in rows)
    assert all(x["same_tokens"] for x in rows[2:4])  # transformers' greedy tokens equal ours
    assert rows[0]["prompt_source"].startswith("text") and "TPOT ms" in r.stdout
    assert not list(tmp_path.glob("*/ppl.jsonl"))  # the books gave the prompts: no PPL was asked for


def test_bad_input_is_one_error_line_and_exit_code_2(tiny_checkpoint, tmp_path):
    r = run_eval("ppl", "--model", tiny_checkpoint, "--data", tmp_path / "missing", "--out", tmp_path)
    assert r.returncode == 2 and r.stderr.startswith("error:") and len(r.stderr.strip().splitlines()) == 1
    assert "Traceback" not in r.stderr


@pytest.mark.parametrize("extra, message", [
    (["--ctx-len", "64", "--stride", "65"], "--stride"),
    (["--compressor", "snapkv", "--kernel-size", "4"], "kernel_size"),
    (["--max-tokens", "1"], "--max-tokens"),
    (["--data-empty"], "no .txt books"),
])
def test_bad_ppl_inputs(tiny_checkpoint, books_dir, tmp_path, capsys, extra, message):
    data = books_dir
    if extra == ["--data-empty"]:
        extra, data = [], tmp_path
    argv = ["ppl", "--model", str(tiny_checkpoint), "--data", str(data), "--ctx-len", "64", "--stride", "32",
            "--out", str(tmp_path), *extra]
    assert run_cli(main, argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error:") and message in err and len(err.strip().splitlines()) == 1
