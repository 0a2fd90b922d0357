"""The continuation task on the embedded trained model (tiny-pg19), on text it sampled itself (no data needed):
full KV and a cache that keeps everything reproduce the reference exactly; a strong compression departs from
it, with records that agree with themselves and with minipythia.generate; the examples are what they say."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from rouge_score import rouge_scorer

import eval.tasks.continuation  # noqa: F401  (registers the task)
from eval.results import read_jsonl
from conftest import score_examples
from eval.tasks import TASKS, TextSource, build_task, sample_text
from minipythia import KnormPress, NoCompression, Pythia, SnapKV, StreamingLLM, Tokenizer, generate
from minipythia.weights import EMBEDDED_MODEL

pytestmark = pytest.mark.usefixtures("single_thread")

NEW = 24
META = dict(model="m", revision=None, dtype="float32")


@pytest.fixture(scope="module")
def model():
    return Pythia.from_pretrained(EMBEDDED_MODEL).for_inference()


@pytest.fixture(scope="module")
def tokenizer():
    return Tokenizer.from_pretrained(EMBEDDED_MODEL)


@pytest.fixture(scope="module")
def streams(model):
    return sample_text(model, n_streams=2, length=1024, seed=0)


@pytest.fixture(scope="module")
def text(streams, tokenizer):
    return TextSource(streams, "sampled by tiny-pg19", tokenizer)


@pytest.fixture(scope="module")
def task():
    return build_task("continuation", dict(contexts=[256, 600], new_tokens=NEW, trials=2))


@pytest.fixture(scope="module")
def examples(task, text, model):
    return task.examples(text, model)


def run(task, model, examples, configs, folder) -> dict[str, list[dict]]:
    """Each config's records, in the examples' order."""
    folder.mkdir(exist_ok=True)
    path_of = lambda c: folder / f"{c.label}.jsonl"  # noqa: E731
    score_examples(task, model, examples, configs, META, path_of)
    return {c.label: read_jsonl(path_of(c)) for c in configs}


@pytest.fixture(scope="module")
def none_records(task, model, examples, tmp_path_factory):
    return run(task, model, examples, [NoCompression()], tmp_path_factory.mktemp("none"))["none"]


def first_mismatch(tokens, reference) -> int:
    for i, (a, b) in enumerate(zip(tokens, reference)):
        if a != b:
            return i
    return len(reference)


def test_registered_with_default_contexts(model):
    assert TASKS["continuation"] is eval.tasks.continuation.Continuation
    assert build_task("continuation", {}).context_lengths(model) == [512, 1024 - 64]  # half, and all but the new


def test_full_kv_reproduces_the_reference(none_records, examples, tokenizer):
    assert len(none_records) == len(examples) == 4
    for r, e in zip(none_records, examples):
        assert r["example"] == e.key
        assert r["generated_ids"] == e.targets.tolist() and r["agree_tokens"] == NEW
        assert r["generated"] == r["reference"] == tokenizer.decode(e.targets.tolist())
        assert r["kl"] == 0.0 and r["top1"] == 1.0 and r["rouge_l"] == 1.0
        assert r["nll"] == r["nll_full"] and r["gain"] == r["gain_full"] and r["weight"] == NEW
        # retained is measured on the KL from full KV: the control's KL is its gain_full
        assert r["retained"] == 1.0 and r["gain_full"] == r["kl_control"] > 0


def test_nlls_equal_a_plain_forward(none_records, examples, model):
    """nll_full and nll_control, from cached prefills, against one uncached forward of prompt + reference
    (catches an off-by-one between the targets and the logits that predict them)."""
    for r, e in zip(none_records, examples):
        for prompt, field in ((e.prompt, "nll_full"), (e.control, "nll_control")):
            ids = torch.cat((prompt, e.targets)).view(1, -1)
            logits = model(ids)[0, prompt.numel() - 1 : -1].float()
            assert r[field] == pytest.approx(F.cross_entropy(logits, e.targets).item(), abs=1e-4)
    assert all(e.control.tolist() == e.prompt[-32:].tolist() for e in examples)


def test_a_cache_that_keeps_everything_is_full_kv(task, model, examples, none_records, tmp_path):
    # Alone in its batch, so that its tokens come from its own generation, not from none's.
    keep_all = SnapKV(max_capacity_prompt=1024)
    records = run(task, model, examples, [keep_all], tmp_path)[keep_all.label]
    own = ("label", "compressor", "settings")
    assert [{k: v for k, v in r.items() if k not in own} for r in records] == \
           [{k: v for k, v in r.items() if k not in own} for r in none_records]


@pytest.mark.parametrize("compressor", [StreamingLLM(n_sink=4, max_capacity_prompt=16), KnormPress(0.9)],
                         ids=lambda c: c.label)
def test_strong_compression_departs_and_its_records_agree(task, model, examples, none_records, tokenizer,
                                                          tmp_path, compressor):
    records = run(task, model, examples, [NoCompression(), compressor], tmp_path)[compressor.label]
    assert all(r["kl"] > 0 and r["top1"] < 1 for r in records)
    assert any(r["agree_tokens"] < NEW for r in records)
    for r, e, full in zip(records, examples, none_records):
        reference = e.targets.tolist()
        assert len(r["generated_ids"]) == NEW
        assert r["agree_tokens"] == first_mismatch(r["generated_ids"], reference) >= 1  # token 1 saw full KV
        assert r["generated"] == tokenizer.decode(r["generated_ids"])
        assert 0.0 <= r["rouge_l"] <= 1.0 and 0.0 <= r["top1"] <= 1.0
        assert r["nll"] != r["nll_full"]
        # What the full-KV side of the batch measured does not depend on the other configs in it.
        for field in ("nll_full", "nll_control", "kl_control", "gain_full", "reference"):
            assert r[field] == full[field]
        assert r["gain"] == pytest.approx(r["kl_control"] - r["kl"])
        assert r["retained"] == pytest.approx(1 - r["kl"] / r["kl_control"])
        # Replay + the task's greedy loop is what a real compressed generation writes.
        assert r["generated_ids"] == generate(model, e.prompt, max_new_tokens=NEW, compressor=compressor).tokens
        # The teacher-forced figures, by another road: a real compressed prefill, and an uncached full forward.
        nll, kl, top1 = forced_by_hand(model, e, compressor)
        assert (r["nll"], r["kl"], r["top1"]) == pytest.approx((nll, kl, top1), abs=1e-4)


def forced_by_hand(model, e, compressor) -> tuple[float, float, float]:
    """NLL of the reference through the compressor's own prefill, KL(full || this) and top-1 agreement."""
    with torch.inference_mode():
        cache = model.new_cache(1, compressor)
        first = model(e.prompt.view(1, -1), cache=cache, last_only=True)[0]
        this = torch.cat((first, model(e.targets[:-1].view(1, -1), cache=cache)[0])).float().log_softmax(-1)
        full = model(torch.cat((e.prompt, e.targets)).view(1, -1))[0, e.prompt.numel() - 1 : -1].float()
        full = full.log_softmax(-1)
    kl = (full.exp() * (full - this)).sum(-1).mean().item()
    top1 = (this.argmax(-1) == full.argmax(-1)).float().mean().item()
    return F.nll_loss(this, e.targets).item(), kl, top1


def test_examples_are_deterministic_and_cut_where_they_say(task, examples, text, model, streams):
    again = build_task("continuation", dict(contexts=[256, 600], new_tokens=NEW, trials=2)).examples(text, model)
    assert [(e.key, e.prompt.tolist(), e.targets.tolist(), e.info) for e in again] == \
           [(e.key, e.prompt.tolist(), e.targets.tolist(), e.info) for e in examples]
    # Three trials on two streams: the third goes back to the first stream, past the tokens the first used.
    moved = build_task("continuation", dict(contexts=[256], new_tokens=NEW, trials=3)).examples(text, model)
    assert [e.info["prompt_from"] for e in moved] == ["sampled-0@0", "sampled-1@0", "sampled-0@256"]
    for e in examples + moved:
        name, start = e.info["prompt_from"].rsplit("@", 1)
        ids = dict(streams)[name]
        assert e.prompt.tolist() == ids[int(start) : int(start) + e.key["context"]].tolist()
        assert e.scored == NEW and e.targets.numel() == NEW
        # The reference is the greedy continuation minipythia.generate writes (the same argmax over the same
        # float32 logits: a cache replayed from one prefill holds exactly what generate's own prefill left).
        assert e.targets.tolist() == generate(model, e.prompt, max_new_tokens=NEW).tokens


def test_without_a_tokenizer_rouge_compares_token_ids(model, streams, tmp_path):
    task = build_task("continuation", dict(contexts=[256], new_tokens=8, trials=1))
    [example] = task.examples(TextSource(streams, "no tokenizer"), model)
    assert example.info["reference"] == " ".join(map(str, example.targets.tolist()))
    compressor = StreamingLLM(n_sink=4, max_capacity_prompt=16)
    [r] = run(task, model, [example], [compressor], tmp_path)[compressor.label]
    assert r["generated"] == " ".join(map(str, r["generated_ids"]))
    expected = rouge_scorer.RougeScorer(["rougeL"]).score(r["reference"], r["generated"])["rougeL"].fmeasure
    assert r["rouge_l"] == expected


@pytest.mark.parametrize("settings, match", [
    (dict(new_tokens=1), "new_tokens must be >= 2"),
    (dict(trials=0), "trials must be >= 1"),
    (dict(contexts=[0]), "contexts must be positive"),
    (dict(control_context=0), "control_context must be >= 1"),
])
def test_bad_settings(settings, match):
    with pytest.raises(ValueError, match=match) as error:
        build_task("continuation", settings)
    assert "\n" not in str(error.value)


@pytest.mark.parametrize("settings, match", [
    (dict(contexts=[1000], new_tokens=64), "needs 1064 positions, more than the model's 1024"),
    (dict(contexts=[32], control_context=32), r"control_context \(32\) must be shorter"),
    (dict(contexts=[600], trials=3), "sampled-0 has 1024 tokens, too few for trial 2's 600 tokens"),
])
def test_settings_the_model_or_text_cannot_serve(settings, match, text, model):
    with pytest.raises(ValueError, match=match) as error:
        build_task("continuation", settings).examples(text, model)
    assert "\n" not in str(error.value)
