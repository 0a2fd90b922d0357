"""The trainer: it learns, it writes a checkpoint both minipythia and transformers load, and it resumes exactly."""

import json

import pytest
import torch

from minipythia.model import Pythia
from minipythia.tokenizer import Tokenizer
from minipythia.train import batch_at, copy_gain, learning_rate, main

ARGS = ["--vocab-size", "300", "--layers", "2", "--hidden", "32", "--heads", "2", "--seq-len", "32",
        "--batch-size", "4", "--warmup", "5", "--eval-every", "10", "--save-every", "10", "--val-books", "1"]


@pytest.fixture(scope="module")
def books(tmp_path_factory):
    root = tmp_path_factory.mktemp("books")
    words = "a small cat sat on the warm mat and looked at the old red door".split()
    g = torch.Generator().manual_seed(1)
    for i in range(3):
        text = " ".join(words[j] for j in torch.randint(len(words), (3000,), generator=g))
        (root / f"book{i}.txt").write_text(text)
    return root


def test_learning_rate_warms_up_then_decays_to_min():
    lrs = [learning_rate(s, 100, 10, 1e-3, 1e-4) for s in range(100)]
    assert lrs[0] == pytest.approx(1e-4) and lrs[9] == pytest.approx(1e-3)
    assert all(a >= b for a, b in zip(lrs[9:], lrs[10:]))
    assert lrs[-1] == pytest.approx(1e-4, rel=1e-2)


def test_batches_are_a_function_of_the_step():
    tokens = torch.arange(1000, dtype=torch.int32)
    x, y = batch_at(tokens, 7, 4, 16, seed=0)
    assert torch.equal(x, batch_at(tokens, 7, 4, 16, seed=0)[0])
    assert not torch.equal(x, batch_at(tokens, 8, 4, 16, seed=0)[0])
    assert torch.equal(y[:, :-1], x[:, 1:])  # targets are the inputs shifted by one


def test_repeat_fraction_pastes_a_span_of_the_row_again_further_on():
    tokens = torch.arange(10_000, dtype=torch.int32)  # all distinct: a repeated id can only be a pasted span
    plain, _ = batch_at(tokens, 3, 4, 300, seed=0)
    x, _ = batch_at(tokens, 3, 4, 300, seed=0, repeat_fraction=1.0)
    for row in x:
        repeated = len(row) - len(set(row.tolist()))
        assert 16 <= repeated <= 128
    assert torch.equal(batch_at(tokens, 3, 4, 300, seed=0, repeat_fraction=0.0)[0], plain)


def test_copy_fraction_replaces_rows_by_a_repeated_run_of_the_texts_tokens():
    tokens = torch.arange(10_000, dtype=torch.int32) % 500 + 1000  # a text whose plain windows never repeat within 48
    x, y = batch_at(tokens, 3, 6, 200, seed=0, copy_fraction=1.0)
    for row in torch.cat((x, y[:, -1:]), dim=1):
        period = next(p for p in range(8, 49) if torch.equal(row[p:], row[:-p]))
        assert len(set(row[:period].tolist())) > 1 and 1000 <= row.min() and row.max() < 1500
    plain = batch_at(tokens, 3, 6, 200, seed=0)[0]
    assert torch.equal(batch_at(tokens, 3, 6, 200, seed=0, copy_fraction=0.0)[0], plain)


class LookBack(torch.nn.Module):
    """Logits that put all the mass on the token `lag` positions back (a perfect copier of period `lag`),
    or uniform logits with lag=None."""

    def __init__(self, vocab_size, lag):
        super().__init__()
        self.vocab_size, self.lag = vocab_size, lag

    def forward(self, ids):
        logits = torch.zeros(*ids.shape, self.vocab_size)
        if self.lag is not None:
            # position t predicts token t+1, which in a repeated run equals token t+1-lag
            source = ids[:, 1 - self.lag :] if self.lag > 1 else ids
            logits[:, self.lag - 1 :].scatter_(-1, source[:, : ids.size(1) - self.lag + 1, None], 30.0)
        return logits


def test_copy_gain_is_zero_without_copying_and_large_with_it():
    text = torch.arange(1, 300)
    assert copy_gain(LookBack(300, None), text) == pytest.approx(0.0, abs=1e-5)
    assert copy_gain(LookBack(300, 100), text) > 5.0  # ~log(300) = 5.7 nats


def test_init_from_starts_a_second_phase_from_a_checkpoint(books, tmp_path):
    first, second = tmp_path / "first", tmp_path / "second"
    main([str(books), str(first), *ARGS, "--steps", "10"])
    main([str(books), str(second), *ARGS, "--steps", "10", "--init-from", str(first), "--lr", "1e-9",
          "--min-lr", "1e-9", "--weight-decay", "0"])
    a, b = Pythia.from_pretrained(first), Pythia.from_pretrained(second)
    for (name, p), q in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.allclose(p, q, atol=1e-3), name  # a negligible learning rate leaves the first phase's weights
    assert (second / "tokenizer.json").read_text() == (first / "tokenizer.json").read_text()
    log = [json.loads(line) for line in (second / "train_log.jsonl").read_text().splitlines()]
    assert "copy_gain" in log[-1]


def test_max_positions_keeps_a_longer_context_than_the_rows(books, tmp_path):
    out = tmp_path / "short-rows"
    main([str(books), str(out), *ARGS, "--steps", "2", "--max-positions", "128", "--copy-fraction", "0.5"])
    assert json.loads((out / "config.json").read_text())["max_position_embeddings"] == 128


def test_wire_induction_writes_a_previous_token_head_before_training(books, tmp_path):
    from test_induction import attention

    out = tmp_path / "wired"
    main([str(books), str(out), *ARGS, "--hidden", "64", "--steps", "1", "--lr", "1e-9", "--min-lr", "1e-9",
          "--wire-induction"])
    ids = torch.randint(1, 300, (2, 32), generator=torch.Generator().manual_seed(0))
    probs = attention(Pythia.from_pretrained(out), ids, layer=0, head=1)  # layer 0, last head
    assert torch.diagonal(probs, offset=-1, dim1=1, dim2=2).mean() > 0.9


def test_wire_induction_needs_two_layers(books, tmp_path, capsys):
    from minipythia.cli import run_cli

    argv = [str(books), str(tmp_path / "out"), *ARGS, "--hidden", "64", "--layers", "1", "--wire-induction"]
    assert run_cli(main, argv) == 2
    assert "induction layer" in capsys.readouterr().err


def test_train_learns_and_writes_a_checkpoint_transformers_loads(books, tmp_path):
    out = tmp_path / "ckpt"
    assert main([str(books), str(out), *ARGS, "--steps", "40"]) == 0
    log = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    assert log[-1]["val_loss"] < log[0]["loss"] - 1.0  # far below the ~5.7 nats of a uniform guess
    assert (out / "loss.png").stat().st_size > 0
    config = json.loads((out / "config.json").read_text())
    assert config["rotary_pct"] == 0.25 and config["use_parallel_residual"] and not config["tie_word_embeddings"]

    from transformers import GPTNeoXForCausalLM

    ours = Pythia.from_pretrained(out)
    theirs = GPTNeoXForCausalLM.from_pretrained(out, torch_dtype=torch.float32).eval()
    ids = torch.tensor([Tokenizer.from_pretrained(out).encode("the old cat sat on a red mat")])
    with torch.no_grad():
        assert (ours(ids) - theirs(ids).logits).abs().max() < 1e-4


def test_an_interrupted_run_resumes_to_the_same_weights(books, tmp_path, monkeypatch):
    whole, split = tmp_path / "whole", tmp_path / "split"
    main([str(books), str(whole), *ARGS, "--steps", "20"])

    # Interrupt the same command during step 15 (its state was saved at step 10), then run it again.
    clip, calls = torch.nn.utils.clip_grad_norm_, []

    def interrupting_clip(*args, **kwargs):
        calls.append(1)
        if len(calls) == 15:
            raise KeyboardInterrupt
        return clip(*args, **kwargs)

    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", interrupting_clip)
    with pytest.raises(KeyboardInterrupt):
        main([str(books), str(split), *ARGS, "--steps", "20"])
    assert torch.load(split / "train-state" / "state.pt")["step"] == 10
    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", clip)
    main([str(books), str(split), *ARGS, "--steps", "20"])

    a, b = Pythia.from_pretrained(whole), Pythia.from_pretrained(split)
    for (name, p), q in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(p, q), name
    assert (whole / "train_log.jsonl").read_text().count("\n") == (split / "train_log.jsonl").read_text().count("\n")


def test_resuming_with_other_options_is_refused(books, tmp_path):
    out = tmp_path / "ckpt"
    main([str(books), str(out), *ARGS, "--steps", "10"])
    with pytest.raises(ValueError, match="other options"):
        main([str(books), str(out), *ARGS, "--steps", "10", "--lr", "1e-2"])


def test_bad_data_dir_is_a_one_line_error(tmp_path, capsys):
    from minipythia.cli import run_cli

    assert run_cli(main, [str(tmp_path / "missing"), str(tmp_path / "out")]) == 2
    assert "is not a directory" in capsys.readouterr().err


def test_training_gradients_equal_transformers(tiny_hf_and_checkpoint):
    """What the trainer optimises is the model transformers defines: same loss and same gradient for every
    weight (the in-place rotary included), on the same weights and tokens, in float32."""
    from conftest import hf_reference

    from minipythia.train import loss_on

    _, checkpoint = tiny_hf_and_checkpoint
    hf = hf_reference().train()
    ours = Pythia.from_pretrained(checkpoint).train()
    for p in ours.parameters():
        p.requires_grad_(True)
    ids = torch.randint(0, hf.config.vocab_size, (2, 40), generator=torch.Generator().manual_seed(0))
    hf(ids, labels=ids).loss.backward()
    loss = loss_on(ours, ids[:, :-1], ids[:, 1:], autocast=False)
    loss.backward()
    hf_params = {name.removeprefix("gpt_neox.").replace("lm_head.", "embed_out."): p
                 for name, p in hf.named_parameters()}
    for name, p in ours.named_parameters():
        reference = hf_params[name].grad
        assert p.grad is not None, name
        torch.testing.assert_close(p.grad, reference, rtol=1e-4, atol=1e-4 * reference.abs().max().item())
