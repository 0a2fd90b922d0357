"""The real Pythia (GPT-NeoX-20B) tokenizer: ids checked against ../shared/tokenizers/gpt-neox-20b/NOTICE.md."""

import shutil

import pytest
from conftest import pythia_tokenizer_path

from minipythia import Tokenizer
from minipythia.weights import ModelNotFoundError


@pytest.fixture(scope="module")
def tokenizer_path():
    path = pythia_tokenizer_path()
    if path is None:
        pytest.skip("the Pythia tokenizer.json is not available (set PYTHIA_TOKENIZER)")
    return path


@pytest.fixture(scope="module")
def tok(tokenizer_path):
    return Tokenizer.from_pretrained(tokenizer_path)


@pytest.mark.parametrize("text,ids", [
    ("Hello world, this is Pythia.", [12092, 1533, 13, 436, 310, 8462, 36005, 15]),
    ("hello", [25521]),
    ("\n", [187]),
    ("", []),
])
def test_known_ids(tok, text, ids):
    assert tok.encode(text) == ids  # no BOS/EOS is added
    assert tok.decode(ids) == text


def test_special_ids(tok):
    assert tok.eos_id == 0
    assert tok.decode([0]) == "<|endoftext|>"
    assert tok.vocab_size == 50277  # 50,254 BPE entries + 23 added whitespace runs; the embedding pads to 50304


@pytest.mark.parametrize("text", [
    "The quick brown fox jumps over the lazy dog.",
    "  leading spaces,\ttabs\nand\n\nnewlines   ",
    "Ünïcödé: café, naïve, Straße, Ελληνικά, русский, 日本語のテキスト, emoji 🦜🚀",
    "code: def f(x):\n    return x ** 2  # comment",
])
def test_decode_inverts_encode(tok, text):
    ids = tok.encode(text)
    assert ids and all(isinstance(i, int) and 0 <= i < tok.vocab_size for i in ids)
    assert tok.decode(ids) == text


def test_from_a_checkpoint_directory(tokenizer_path, tmp_path):
    shutil.copy(tokenizer_path, tmp_path / "tokenizer.json")
    (tmp_path / "config.json").write_text("{}")
    assert Tokenizer.from_pretrained(tmp_path).encode("hello") == [25521]


def test_checkpoint_directory_without_tokenizer(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(ModelNotFoundError, match="tokenizer.json"):
        Tokenizer.from_pretrained(tmp_path)
