"""The GPT-NeoX BPE tokenizer, read from a checkpoint's tokenizer.json with the `tokenizers` library."""

from __future__ import annotations

from pathlib import Path

from tokenizers import Tokenizer as _HFTokenizer

from .weights import ModelNotFoundError, resolve


class Tokenizer:
    def __init__(self, path: str | Path):
        self.path = Path(path)
        try:
            self._tok = _HFTokenizer.from_file(str(self.path))
        except Exception as e:  # the tokenizers library raises a bare Exception for a malformed file
            raise ValueError(f"{self.path} is not a tokenizer.json the tokenizers library can read "
                             f"({str(e).splitlines()[0]}); restore it from the checkpoint") from None
        # Pythia's id 0 is <|endoftext|>; a tokenizer trained by us names its own.
        self.eos_id = self._tok.token_to_id("<|endoftext|>")

    @classmethod
    def from_pretrained(cls, source: str | Path, revision: str | None = None) -> "Tokenizer":
        """`source` as for Pythia.from_pretrained: a checkpoint directory, a tokenizer.json, or a hub id."""
        path = Path(source).expanduser()
        if path.is_file():
            return cls(path)
        directory = resolve(source, revision)
        if not (directory / "tokenizer.json").is_file():
            raise ModelNotFoundError(f"{directory} has no tokenizer.json")
        return cls(directory / "tokenizer.json")

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False).ids

    def decode(self, ids) -> str:
        return self._tok.decode(list(ids), skip_special_tokens=False)

    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size()
