"""Sliding windows scored several at a time (eval.ppl's batch_windows) give exactly the figures of one window
at a time, for every registered policy: each batch row is compressed on its own, and sees no other row's
entries. On the tiny random checkpoint: 300 tokens in windows of 96 advancing by 24, so after the first
(uncached) window come eight of one shape (72 prompt tokens, 24 targets) and a last, shorter one: batches of
3, 3 and 2 at batch_windows=3, one of 8 at batch_windows=8.

Two kinds of policy would give other figures in one batched cache, and are replayed a row at a time
(Compressor.scored_by_row), which these tests check as well: `random` draws its scores per batch row, so a
window in row 1 would get other draws than alone; head-wise policies (AdaKV) pad every head of a batch to
the longest head of any row, and attention over more (masked) padding rounds otherwise."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch

from eval.ppl import sliding_window_nlls, sliding_window_scores, windows
from minipythia import COMPRESSORS, KnormPress, Pythia, SnapKV, build_compressor

CTX_LEN, STRIDE, SHORT = 96, 24, 16
C = 40  # of a 72-token prompt: every budgeted policy compresses

# Settings that make each registered policy compress a 72-token prompt of the tiny model (2 layers, 4 heads).
SETTINGS = {
    "none": {}, "knorm": dict(compression_ratio=0.5), "snapkv": dict(window_size=8, max_capacity_prompt=C),
    "streaming_llm": dict(n_sink=4, max_capacity_prompt=C), "h2o": dict(max_capacity_prompt=C),
    "tova": dict(max_capacity_prompt=C), "random": dict(max_capacity_prompt=C, seed=0),
    "pyramidkv": dict(window_size=8, max_capacity_prompt=C, kernel_size=3), "oracle": None,
    "adakv": dict(max_capacity_prompt=C), "chunkkv": dict(max_capacity_prompt=C, chunk_size=8),
    "criticalkv": dict(max_capacity_prompt=C), "criticaladakv": dict(max_capacity_prompt=C),
    "duo_attention": dict(sink_size=4, recent_size=16),
    "expected_attention": dict(max_capacity_prompt=C, n_future_positions=32), "keydiff": dict(max_capacity_prompt=C),
    "kvzip": dict(max_capacity_prompt=C, chunk_size=32),  # three chunks, the last of 8 tokens
    "lagkv": dict(max_capacity_prompt=C, lag_size=8), "merging": dict(max_capacity_prompt=C, merge_budget=8),
    "per_layer": dict(max_capacity_prompt=C), "think": dict(max_capacity_prompt=C, window_size=8),
}
FIELDS = ("nll", "compressed_nll", "kl", "top1", "full_nll", "short_nll")


@pytest.fixture(scope="module")
def tiny(tiny_checkpoint):
    return Pythia.from_pretrained(tiny_checkpoint).for_inference()


@pytest.fixture(scope="module")
def ids():
    return torch.randint(0, 512, (300,), generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="module")
def uncompressed(tiny, ids):
    return sliding_window_scores(tiny, ids, CTX_LEN, STRIDE, [None])[0].nll


def scores(model, ids, compressors, batch_windows):
    return sliding_window_scores(model, ids, CTX_LEN, STRIDE, compressors, short_context=SHORT,
                                 batch_windows=batch_windows)


@pytest.mark.parametrize("name", list(COMPRESSORS))
def test_every_policy_scores_batched_windows_as_one_at_a_time(tiny, ids, uncompressed, name):
    if name not in SETTINGS:
        pytest.fail(f"{name} is registered but has no settings in SETTINGS here: give it some that compress")
    if SETTINGS[name] is None:
        pytest.skip(f"{name} needs the queries of the tokens after each prompt, which a sweep of windows lacks")
    compressor = build_compressor(name, SETTINGS[name])
    one, batched = (scores(tiny, ids, [compressor], b)[0] for b in (1, 3))
    if name != "none":
        assert not torch.equal(one.nll, uncompressed), f"{name} compresses nothing with these settings"
    assert one.kept_by_head == batched.kept_by_head
    for field in FIELDS:
        assert torch.equal(getattr(batched, field), getattr(one, field)), field


def test_a_full_batch_of_eight_and_the_nll_entry_point(tiny, ids):
    """batch_windows=8: the prefill's last logits (the first target's) are the LM head's product of 8 rows,
    which a BLAS rounds otherwise than one row's unless it is computed a row at a time (Pythia.forward)."""
    compressors = [None, SnapKV(window_size=8, max_capacity_prompt=C), KnormPress(0.5)]
    for one, batched in zip(scores(tiny, ids, compressors, 1), scores(tiny, ids, compressors, 8)):
        for field in FIELDS:
            assert torch.equal(getattr(batched, field), getattr(one, field)), field
    by_one, by_eight = (sliding_window_nlls(tiny, ids, CTX_LEN, STRIDE, compressors, batch_windows=b) for b in (1, 8))
    assert all(torch.equal(x, y) for x, y in zip(by_one, by_eight))


def test_a_prefills_last_logits_do_not_depend_on_its_batch(tiny):
    """The first target of every window is predicted by its prefill's last logits (last_only): one row of
    the LM head's product, which must round as that row alone does (it does not as one GEMM of 8 rows)."""
    prompts = torch.randint(0, 512, (8, 72), generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        alone = torch.cat([tiny(row, last_only=True) for row in prompts.split(1)])
        assert torch.equal(tiny(prompts, last_only=True), alone)


def test_kept_by_head_is_a_mean_per_window_whatever_the_batches(tiny, ids):
    adakv = build_compressor("adakv", dict(max_capacity_prompt=C))
    kept = [scores(tiny, ids, [adakv], b)[0].kept_by_head for b in (1, 3, 4, 8)]
    assert all(k == kept[0] for k in kept[1:])
    per_head = torch.tensor(kept[0])  # (layers, heads)
    assert per_head.shape == (2, 4) and len(set(per_head.flatten().tolist())) > 1, "heads keep different numbers"
    assert per_head.mean(dim=1).tolist() == pytest.approx([C, C]), "AdaKV's layer total is nh * C"


@dataclass
class PoisonedKnorm(KnormPress):
    """KnormPress whose kept values turn NaN in prompts that start with `marker`: a non-finite NLL in one
    window, wherever that window falls in a batch."""
    marker: int = -1

    def prepare(self, model, prompt):
        self.poisoned = prompt.input_ids[:, 0] == self.marker  # (B,)

    def kept_values(self, layer, keys, values, queries, idx):
        kept = values.gather(2, idx[..., None].expand(-1, -1, -1, values.size(-1)))
        return kept.masked_fill(self.poisoned[:, None, None, None], float("nan"))


def test_a_non_finite_nll_raises_the_same_error_whatever_the_batches(tiny, ids):
    begin = 5 * STRIDE  # the sixth window: the second row of the second batch of 3
    prompts = [int(ids[b]) for b, _, prompt_len in windows(ids.numel(), CTX_LEN, STRIDE) if prompt_len]
    assert prompts.count(int(ids[begin])) == 1, "the marker must start one window's prompt only"
    poisoned = PoisonedKnorm(0.5, marker=int(ids[begin]))
    errors = []
    for b in (1, 3):
        with pytest.raises(ValueError, match="non-finite NLL") as error:
            sliding_window_scores(tiny, ids, CTX_LEN, STRIDE, [None, poisoned], batch_windows=b)
        errors.append(str(error.value))
    assert errors[0] == errors[1] and f"window of tokens {begin}..{begin + CTX_LEN} with knorm_r0.5" in errors[0]


@pytest.mark.parametrize("bad", [0, -2, 1.5, True, "4"])
def test_bad_batch_windows_is_a_one_line_value_error(tiny, ids, bad):
    with pytest.raises(ValueError, match="batch_windows must be an integer >= 1") as error:
        sliding_window_scores(tiny, ids, CTX_LEN, STRIDE, [None], batch_windows=bad)
    assert "\n" not in str(error.value)


def test_a_sweep_with_batched_windows_writes_the_unbatched_files(scale_grid, tmp_path, capsys):
    from conftest import result_files
    from eval.__main__ import main
    from minipythia.cli import run_cli

    one_member = scale_grid.read_text().replace("revision: [step1, step2]", "revision: step1").replace(
        f"model: [{scale_grid.parent / 'narrow'}, {scale_grid.parent / 'deep'}]", f"model: {scale_grid.parent / 'deep'}")
    (tmp_path / "s.yaml").write_text(one_member)
    for n in (1, 4):
        assert run_cli(main, ["sweep", str(tmp_path / "s.yaml"), "--batch-windows", str(n),
                              "--out", str(tmp_path / f"bw{n}")]) == 0
    files = result_files(tmp_path / "bw1")
    assert any(name.endswith("ppl.jsonl") for name in files) and files == result_files(tmp_path / "bw4")
    (tmp_path / "stream.yaml").write_text(one_member.replace("stride: 16", "mode: stream\ndecode_interval: 8")
                                          .replace("tasks: [ppl, {recall: {contexts: [96], depths: [0.5], trials: 2, "
                                                   "passage_tokens: 16, cue_tokens: 4}}]", "tasks: [ppl]"))
    assert run_cli(main, ["sweep", str(tmp_path / "stream.yaml"), "--batch-windows", "4",
                          "--out", str(tmp_path / "stream")]) == 2
    assert "batch_windows batches sliding windows" in capsys.readouterr().err


@pytest.mark.parametrize("task_name,settings", [
    ("recall", dict(contexts=[128], depths=[0.2, 0.6], trials=2, passage_tokens=24, cue_tokens=4)),
    ("needle", dict(contexts=[128], depths=[0.3, 0.7], trials=1)),
])
def test_task_examples_of_one_shape_scored_as_a_batch_score_as_one_at_a_time(tiny_pg19, task_name, settings):
    """Task.score_batch: a row per example, every record field equal to score()'s on the example alone, for
    policies batched in one cache and for those replayed a row at a time (random, head-wise)."""
    from eval.tasks import TextSource, build_task, example_shape, sample_text

    model, tokenizer = tiny_pg19
    text = TextSource(sample_text(model, 2, 512, seed=1), "sampled", tokenizer)
    task = build_task(task_name, settings)
    examples = task.examples(text, model)
    groups = {}
    for e in examples:
        groups.setdefault(example_shape(e), []).append(e)
    assert max(len(g) for g in groups.values()) > 1  # something is batched
    configs = [build_compressor(name, SETTINGS[name]) for name in ("snapkv", "knorm", "random", "adakv", "kvzip")]
    for group in groups.values():
        assert task.score_batch(model, group, configs) == [task.score(model, e, configs) for e in group]


@pytest.fixture(scope="module")
def tiny_pg19():
    from minipythia import Tokenizer
    from minipythia.weights import EMBEDDED_MODEL

    return Pythia.from_pretrained(EMBEDDED_MODEL).for_inference(), Tokenizer.from_pretrained(EMBEDDED_MODEL)
