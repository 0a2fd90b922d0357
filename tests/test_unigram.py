"""The unigram floor: add-one smoothed frequencies, scored on every token of a book but the first."""

import math

import pytest
import torch

from eval.unigram import main, unigram_ppl


def test_unigram_ppl_by_hand():
    counts = torch.tensor([3.0, 1.0, 0.0])  # smoothed: 4/7, 2/7, 1/7
    ppl, n = unigram_ppl(counts, [torch.tensor([0, 1]), torch.tensor([2])])
    expected = math.exp(-(math.log(4 / 7) + math.log(2 / 7) + math.log(1 / 7)) / 3)
    assert n == 3 and ppl == pytest.approx(expected)


def test_unigram_cli(tiny_checkpoint, tmp_path, capsys):
    (tmp_path / "train").mkdir()
    (tmp_path / "train" / "a.txt").write_text("the quick brown fox jumps over the lazy dog. " * 20)
    (tmp_path / "test.txt").write_text("the lazy dog jumps over the quick brown fox.")
    assert main(["--model", str(tiny_checkpoint), "--train", str(tmp_path / "train"),
                 "--data", str(tmp_path / "test.txt")]) == 0
    ppl = float(capsys.readouterr().out.split()[2])
    assert 1 < ppl < 512  # frequent words of the training text: far better than the uniform 512-token guess
