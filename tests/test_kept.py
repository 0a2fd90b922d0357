"""`python -m eval kept` (eval/kept.py): the overlap with the oracle against hand-computed cases, the page's content
without a browser, the command end to end and its bad input, and the page in a real headless browser (chromium's
--dump-dom after its script ran, and a screenshot), skipped where no chromium or chrome is installed."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import pytest
import torch

from eval.__main__ import main, task_settings
from eval.kept import Kept, example_spans, oracle_overlap, page_html
from eval.sweep import task_text
from eval.tasks import TextSource, build_task, sample_text
from minipythia import Pythia, Tokenizer
from minipythia.cli import run_cli

BROWSERS = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable", "chrome")
RECALL = ["--task", "recall", "--set", "contexts=[64]", "--set", "depths=[0.5]", "--set", "trials=1",
          "--set", "passage_tokens=16", "--set", "cue_tokens=4"]
SNAPKV = "snapkv_w4_c16_k3_avgpool"
POLICIES = ["--policies", "[{compressor: oracle, max_capacity_prompt: 16}, "
                          "{compressor: snapkv, window_size: 4, max_capacity_prompt: 16, kernel_size: 3}]",
            "--policies", "{compressor: streaming_llm, n_sink: 2, max_capacity_prompt: 16}", "--policies", "none"]


def test_overlap_is_the_share_of_the_oracles_pairs_kept_at_the_policys_counts():
    kept = torch.tensor([[1, 1, 0, 0], [0, 1, 1, 0]], dtype=torch.bool)
    scores = torch.tensor([[4.0, 3.0, 2.0, 1.0], [1.0, 2.0, 3.0, 4.0]])
    # The oracle keeps {0, 1} of head 0 (both kept) and {2, 3} of head 1 (2 kept): 3 of 4.
    assert oracle_overlap(kept, scores) == (3, 4)
    # A head-wise layout: head 0 keeps 1 entry, head 1 keeps 3; the oracle keeps as many per head: {0} and {1, 2, 3}.
    kept = torch.tensor([[0, 1, 0, 0], [1, 1, 1, 0]], dtype=torch.bool)
    assert oracle_overlap(kept, scores) == (2, 4)
    assert oracle_overlap(torch.zeros(2, 4, dtype=torch.bool), scores) == (0, 0)


def hand_page() -> str:
    tokens = ["<script>alert(1)</script>", " a&b", "\n", " c", " cue", " ans"]
    scores = [torch.tensor([[4.0, 3.0, 2.0, 1.0], [1.0, 2.0, 3.0, 4.0]]),
              torch.tensor([[1.0, 2.0, 3.0, 4.0], [1.0, 2.0, 3.0, 4.0]])]
    mine = Kept("mine<x>", [torch.tensor([[1, 1, 0, 0], [0, 1, 1, 0]], dtype=torch.bool),
                            torch.tensor([[1, 0, 0, 1], [1, 0, 0, 1]], dtype=torch.bool)])
    everything = Kept("everything", [torch.ones(2, 4, dtype=torch.bool)] * 2)
    spans = {"evidence": (1, 3), "cue": (4, 5), "answer": (5, 6)}
    return page_html("a title", ["about <this>"], tokens, 4, spans, [mine, everything], scores)


def page_data(page: str) -> dict:
    return json.loads(re.search(r'<script id="kept-data" type="application/json">(.*?)</script>', page, re.S).group(1))


def overlap_rows(page: str) -> dict[str, list[str]]:
    """label -> the overlap table's cells after it."""
    table = re.search(r'<table class="overlap">(.*?)</table>', page, re.S).group(1)
    rows = re.findall(r"<tr><th>(.*?)</th>(.*?)</tr>", table)
    return {label: re.findall(r"<td>(?:<b>)?(.*?)(?:</b>)?</td>", cells) for label, cells in rows if "<td>" in cells}


def test_the_page_holds_each_configuration_the_escaped_tokens_and_the_overlaps():
    page = hand_page()
    assert "<script>alert" not in page and "&lt;script&gt;alert(1)&lt;/script&gt;" in page
    assert " a&amp;b" in page and "↵\n" in page and "about &lt;this&gt;" in page
    assert "mine&lt;x&gt;" in page and "mine<x>" not in page  # labels are escaped too (the JSON's "<" as \u003c)
    # Marks: the evidence's tokens are prompt tokens 1 and 2; the cue and the answer come after the prompt.
    assert re.findall(r'<span class="t evidence" data-i="(\d)">', page) == ["1", "2"]
    assert '<span class="a cue"> cue</span><span class="a answer"> ans</span>' in page
    rows = overlap_rows(page)
    # mine: kept per head 2.0; evidence (tokens 1, 2 over 2 layers x 2 heads) 3 of 8 kept; layer 0 as in the case
    # above (3 of 4); layer 1: the oracle keeps {2, 3} of both heads, mine kept 3 of each: 2 of 4; in all 5 of 8.
    assert rows["mine&lt;x&gt;"] == ["2.0", "0.38", "0.75", "0.50", "0.62"]
    assert rows["everything"] == ["4.0", "1.00", "1.00", "1.00", "1.00"]
    data = page_data(page)
    assert [c["label"] for c in data["configs"]] == ["mine<x>", "everything"]
    assert data["configs"][0]["counts"] == [[1, 2, 1, 0], [2, 0, 0, 2]] and data["heads"] == 2


@pytest.fixture(scope="module")
def sampled(tiny_checkpoint):
    model = Pythia.from_pretrained(tiny_checkpoint).for_inference()
    tokenizer = Tokenizer.from_pretrained(tiny_checkpoint)
    return model, TextSource(sample_text(model, 2, 256, seed=0), "sampled", tokenizer)


def test_spans_mark_the_passage_the_cue_and_the_answer_of_recall(sampled):
    model, text = sampled
    for cue_in_prompt in (False, True):
        task = build_task("recall", dict(contexts=[64], depths=[0.3], trials=1, passage_tokens=16, cue_tokens=4,
                                         cue_in_prompt=cue_in_prompt))
        (example,) = task.examples(text, model)
        spans = example_spans(task, example)
        sequence = torch.cat((example.prompt, example.targets))
        a, b = spans["evidence"]
        passage = sequence[a:b]
        assert b - a == 16 and b <= example.prompt.numel()
        assert torch.equal(sequence[slice(*spans["cue"])], passage[:4])  # the cue repeats the passage's start
        assert torch.equal(sequence[slice(*spans["answer"])], passage[4:])  # and the answer is the rest
        assert spans["answer"][1] == sequence.numel() and (spans["cue"][0] < example.prompt.numel()) == cue_in_prompt


def test_spans_mark_the_needle_the_question_and_the_answer(sampled):
    model, text = sampled
    task = build_task("needle", dict(kinds=["passkey"], contexts=[128], depths=[0.5], trials=1))
    (example,) = task.examples(text, model)
    spans = example_spans(task, example)
    sequence = torch.cat((example.prompt, example.targets))
    a, b = spans["evidence"]
    differs = (example.prompt != example.control).nonzero().squeeze(1)
    assert a <= differs.min() and differs.max() < b  # the control differs from the prompt only in the needle
    decode = text.tokenizer.decode
    assert decode(sequence[slice(*spans["answer"])].tolist()).strip() == example.info["answer"]
    assert "pass key?" in decode(sequence[slice(*spans["cue"])].tolist())


@pytest.fixture(scope="module")
def kept_folder(tiny_checkpoint, tmp_path_factory):
    """A results folder with a task run (its sweep.json and report) and then the kept page written into it."""
    out = tmp_path_factory.mktemp("kept") / "out"
    assert run_cli(main, ["task", "recall", "--model", str(tiny_checkpoint), *RECALL[2:], "--out", str(out)]) == 0
    assert run_cli(main, ["kept", "--model", str(tiny_checkpoint), *RECALL, *POLICIES, "--out", str(out)]) == 0
    return out


def test_the_command_writes_the_page_and_the_report_links_to_it(kept_folder):
    page = (kept_folder / "kept.html").read_text()
    rows = overlap_rows(page)
    assert list(rows) == ["oracle_c16", SNAPKV, "streaming_llm_sink2_c16", "none"]  # in the order given
    # The oracle at its own counts is the oracle: 1 in every layer, which checks that the page's oracle scores
    # with the same future (the example's targets) as the oracle configuration's cache.
    assert rows["oracle_c16"][0] == "16.0" and set(rows["oracle_c16"][2:]) == {"1.00"}
    assert rows["none"][0] == "64.0" and rows["streaming_llm_sink2_c16"][0] == "16.0"
    assert "recall example 0 of 1" in page and "[kept.html](kept.html)" in (kept_folder / "report.md").read_text()


SWEEP = """
data: {books}
ctx_len: 48
stride: 16
max_tokens: 96
tasks:
  - ppl
  - recall: {{contexts: [64], depths: [0.2, 0.8], trials: 1, passage_tokens: 16, cue_tokens: 4}}
policies:
  - {{compressor: none}}
  - {{compressor: snapkv, window_size: 4, max_capacity_prompt: 16, kernel_size: 3}}
  - {{compressor: oracle, max_capacity_prompt: 16}}
"""


def test_a_sweep_with_kept_writes_the_page_of_its_own_first_recall_example(tiny_checkpoint, tmp_path):
    books = tmp_path / "books"
    books.mkdir()
    g = torch.Generator().manual_seed(0)
    for name in ("alpha", "beta"):
        (books / f"{name}.txt").write_text(" ".join(f"w{int(i)}" for i in torch.randint(50, (300,), generator=g)))
    (tmp_path / "s.yaml").write_text(SWEEP.format(books=books))
    out = tmp_path / "out"
    assert run_cli(main, ["sweep", str(tmp_path / "s.yaml"), "--model", str(tiny_checkpoint), "--kept",
                          "--out", str(out)]) == 0
    page = (out / "kept.html").read_text()
    # The sweep's recall settings (its first example: depth 0.2), its configurations and its books.
    assert '{"context": 64, "depth": 0.2, "trial": 0}'.replace('"', "&quot;") in page and "alpha@0" in page
    assert list(overlap_rows(page)) == ["none", SNAPKV, "oracle_c16"]  # the sweep's order: it runs the oracle too
    assert "[kept.html](kept.html)" in (out / "report.md").read_text()


@pytest.mark.parametrize("argv,message", [
    (["--task", "continuation"], "--task 'continuation': kept shows an example of recall or needle"),
    (["--task", "nope"], "--task 'nope': kept shows an example of recall or needle"),
    ([*RECALL, "--example", "1"], "--example 1: recall has 1 examples with these settings (0 to 0)"),
    ([*RECALL, "--example", "-1"], "--example must be >= 0"),
    ([*RECALL, "--set", "trial=2"], "task recall has no setting 'trial'"),
    ([*RECALL, "--policies", "{compressor: snapkv"], "--policies '{compressor: snapkv': not valid YAML"),
    ([*RECALL, "--policies", "snapkvv"], "unknown compressor 'snapkvv'"),
    ([*RECALL, "--config", "nothere.yaml"], "sweep config 'nothere.yaml' does not exist"),
])
def test_bad_input_is_one_line_and_exit_code_2(tiny_checkpoint, tmp_path, capsys, argv, message):
    assert run_cli(main, ["kept", "--model", str(tiny_checkpoint), *argv, "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert message in err[-1] and err[-1].startswith("error: ")
    assert not (tmp_path / "out" / "kept.html").exists()


# --- in a real browser ---------------------------------------------------------------------------------------

def browser() -> str | None:
    return next((path for path in map(shutil.which, BROWSERS) if path), None)


def headless(tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    """chromium (or chrome) headless, with a user-data dir of its own, bounded in time. --no-sandbox: CI runs as
    root, where chromium refuses its sandbox; the page is our own local file."""
    command = [browser(), "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--hide-scrollbars",
               f"--user-data-dir={tmp_path / 'profile'}", *args]
    return subprocess.run(command, capture_output=True, text=True, timeout=120, check=True)


class TokenSpans(HTMLParser):
    """The prompt's token spans of a page's DOM: (index, style, classes, text) each."""

    def __init__(self):
        super().__init__()
        self.spans, self._open = [], None

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "span" and "t" in (attrs.get("class") or "").split() and "data-i" in attrs:
            self._open = [int(attrs["data-i"]), attrs.get("style") or "", attrs["class"].split(), ""]

    def handle_data(self, data):
        if self._open is not None:
            self._open[3] += data

    def handle_endtag(self, tag):
        if tag == "span" and self._open is not None:
            self.spans.append(tuple(self._open))
            self._open = None


def rendered_tokens(tmp_path: Path, page: Path, view: str) -> list[tuple]:
    parser = TokenSpans()
    parser.feed(headless(tmp_path, "--dump-dom", f"{page.as_uri()}#{view}").stdout)
    return parser.spans


@pytest.mark.skipif(browser() is None, reason=f"no headless browser installed ({', '.join(BROWSERS)} not on PATH)")
def test_a_headless_browser_shows_the_tokens_coloured_by_the_chosen_layer(kept_folder, tiny_checkpoint, tmp_path):
    page = kept_folder / "kept.html"
    data = page_data(page.read_text())
    counts = next(c["counts"] for c in data["configs"] if c["label"] == SNAPKV)  # per layer, per token
    assert counts[0] != counts[1]  # the two layers kept different tokens: switching must change the colours
    # The prompt the command drew: the same example of the same sampled text (seeded), decoded token by token.
    model, tokenizer = Pythia.from_pretrained(tiny_checkpoint).for_inference(), Tokenizer.from_pretrained(tiny_checkpoint)
    task = build_task("recall", task_settings(RECALL[3::2]))
    (example,) = task.examples(task_text([], tokenizer, model), model)
    expected = [tokenizer.decode([i]).replace("\n", "↵\n") for i in example.prompt.tolist()]
    views = {layer: rendered_tokens(tmp_path, page, f"layer={layer}&config={SNAPKV}") for layer in (0, 1)}
    for layer, spans in views.items():
        # The tokens are there, as the tokenizer decodes them ...
        assert [i for i, *_ in spans] == list(range(len(expected))) and [t for *_, t in spans] == expected
        # ... and the script coloured exactly those that some head of the chosen layer kept.
        coloured = [("background" in style) for _, style, _, _ in spans]
        assert coloured == [n > 0 for n in counts[layer]]
        assert [("dropped" in classes) for _, _, classes, _ in spans] == [n == 0 for n in counts[layer]]
    assert [s for _, s, _, _ in views[0]] != [s for _, s, _, _ in views[1]]

    from PIL import Image

    shot = tmp_path / "kept.png"
    headless(tmp_path, "--window-size=1000,700", f"--screenshot={shot}", f"{page.as_uri()}#layer=0&config={SNAPKV}")
    image = Image.open(shot).convert("RGB")
    assert image.size == (1000, 700)
    # Not blank: the kept tokens' and strips' blue backgrounds are on screen.
    blue = sum(1 for r, g, b in image.getdata() if b > r + 60 and b > g + 20)
    assert blue > 500, blue
