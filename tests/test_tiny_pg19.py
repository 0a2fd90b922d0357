"""Checks that need a model that has learnt something: the embedded weights/tiny-pg19, offline, in seconds.

The text scored is the first 4096 tokens of a PG-19 test book (skipped where ../shared is absent).
"""

import pytest
import torch

from eval.ppl import sliding_window_nll
from eval.speed import load_hf
from minipythia import KVCache, Pythia, SnapKV, Tokenizer
from minipythia.compressors import COMPRESSORS
from minipythia.train import copy_gain
from minipythia.weights import EMBEDDED_MODEL

from conftest import pg19_dir

CTX, STRIDE, BUDGET = 1024, 256, 256


@pytest.fixture(scope="module")
def model():
    return Pythia.from_pretrained(EMBEDDED_MODEL).for_inference()


@pytest.fixture(scope="module")
def text_ids():
    books = pg19_dir()
    if books is None:
        pytest.skip("no local PG-19 books (../shared/data/pg19-test or $PG19_DIR)")
    text = sorted(books.glob("*.txt"))[0].read_text(encoding="utf-8")
    return torch.tensor(Tokenizer.from_pretrained(EMBEDDED_MODEL).encode(text)[:4096])


def ppl(model, ids, compressor=None) -> float:
    return sliding_window_nll(model, ids, CTX, STRIDE, compressor).mean().exp().item()


def test_checkpoint_is_the_documented_shape(model):
    c = model.config
    assert (c.num_hidden_layers, c.hidden_size, c.rotary_pct, c.use_parallel_residual) == (4, 192, 0.25, True)
    assert c.max_position_embeddings == CTX


def test_the_model_uses_its_context(model, text_ids):
    """More context must lower the NLL of the same tokens, or compression could cost nothing."""
    full = sliding_window_nll(model, text_ids, CTX, STRIDE)
    short = sliding_window_nll(model, text_ids, 128, 32)
    # 0.038 nats here for the shipped weights; 0.010 for the phase-2 weights, before the copy circuit
    assert full.mean() < short.mean() - 0.02


def test_the_model_copies_a_repeated_run(model, text_ids):
    """The copy (induction) circuit written in phase 3 survived training: 1.2 nats here, phase 2 gave -0.1."""
    assert copy_gain(model, text_ids) > 0.5


def test_snapkv_keeps_ppl_closer_to_full_than_random_eviction(model, text_ids):
    full = ppl(model, text_ids)
    snapkv = ppl(model, text_ids, SnapKV(window_size=32, max_capacity_prompt=BUDGET, kernel_size=5))
    random = ppl(model, text_ids, COMPRESSORS["random"](max_capacity_prompt=BUDGET, seed=0))
    assert full <= snapkv < random
    assert (random - full) > 2 * (snapkv - full)


def test_a_position_bug_after_compression_raises_ppl_sharply(model, text_ids, monkeypatch):
    """The classic bug: numbering new tokens from the kept count instead of the tokens seen."""
    policy = SnapKV(window_size=32, max_capacity_prompt=BUDGET, kernel_size=5)
    right = ppl(model, text_ids, policy)

    def advance_from_kept_count(self, num_tokens):
        self.seen = len(self)

    monkeypatch.setattr(KVCache, "advance", advance_from_kept_count)
    wrong = ppl(model, text_ids, policy)
    assert wrong > 1.5 * right


def test_transformers_reads_the_shipped_weights_the_same_way(model):
    theirs = load_hf(EMBEDDED_MODEL, torch.float32)
    ids = torch.randint(1, model.config.vocab_size, (2, 300), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert (model(ids) - theirs(ids).logits).abs().max() < 1e-4
