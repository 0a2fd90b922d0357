"""Eval text: books from a local directory of .txt files, listed files, or a text dataset of the Hugging Face hub.

`--data pg19` reads $PG19_DIR when it is set, else the parquet mirror of the PG-19 test split; `wikitext-2` and
`wikitext-103` are WikiText's raw test splits, each one document (its lines joined, as WikiText perplexity is
usually reported); `hf:NAME[:CONFIG][#COLUMN]` is any dataset `datasets.load_dataset` reads, a hub id or a local
folder of data files, each non-empty row of its test split a book (column `text` unless named). Hub data is downloaded
once into the Hugging Face cache (HF_HUB_OFFLINE=1 reads it there); when it cannot be had the error says so in
one line, and a sweep goes on without PPL (its tasks on sampled text). Offline, point --data at a directory.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

from minipythia.bounded import first_line
from minipythia.hub import check_hub_answers, quiet_hub_logs

PG19_HUB = "emozilla/pg19-test"


@dataclass(frozen=True)
class HubText:
    """A text dataset `datasets.load_dataset` reads, and how its rows become books."""
    name: str  # hub id or local folder
    config: str | None = None
    column: str = "text"
    joined: bool = False  # all rows one document, named after the dataset (WikiText's rows are its lines)
    title_column: str | None = None  # a row's book name (else the row's number)
    split: str = "test"

    @property
    def label(self) -> str:
        return self.name + (f":{self.config}" if self.config else "")


# --data names of the datasets we know, beside hf:NAME[:CONFIG][#COLUMN].
NAMED_DATA = {
    "pg19": HubText(PG19_HUB, title_column="short_book_title"),
    "wikitext-2": HubText("Salesforce/wikitext", "wikitext-2-raw-v1", joined=True),
    "wikitext-103": HubText("Salesforce/wikitext", "wikitext-103-raw-v1", joined=True),
}


class DataError(ValueError):
    """The eval text cannot be found or read (a ValueError, so the CLIs exit with code 2)."""


@dataclass
class Book:
    name: str
    text: str
    source: str  # the file or dataset it came from


def load_books(data: list[str] | str, books: int | None = None) -> list[Book]:
    """`data` = ["pg19"] | [DIR] | [FILE, ...]; a directory gives every *.txt in it, sorted, named by stem."""
    data = [data] if isinstance(data, str) else list(data)
    if books is not None and books < 1:
        raise DataError(f"--books must be >= 1, got {books}")
    if data == ["pg19"] and os.environ.get("PG19_DIR"):
        found = _from_dir(Path(os.environ["PG19_DIR"]), books)
    elif len(data) == 1 and (data[0] in NAMED_DATA or data[0].startswith("hf:")):
        found = _from_hub(hub_text(data[0]), books)
    elif len(data) == 1 and Path(data[0]).is_dir():
        found = _from_dir(Path(data[0]), books)
    else:
        for f in data:
            if Path(f).is_dir():
                raise DataError(f"--data takes one directory or a list of files; {f!r} is a directory among others")
            if not Path(f).is_file():
                raise DataError(f"data {f!r} does not exist (--data takes {', '.join(NAMED_DATA)}, "
                                f"hf:NAME[:CONFIG][#COLUMN], a directory of .txt books, or .txt files)")
        found = [_read(Path(f)) for f in data][:books]
    names = [b.name for b in found]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise DataError(f"several books are named {', '.join(duplicates)}; give files with distinct names")
    return found


def _read(path: Path) -> Book:
    try:
        return Book(path.stem, path.read_text(encoding="utf-8"), str(path))
    except UnicodeDecodeError as e:
        raise DataError(f"{path} is not UTF-8 text ({e.reason} at byte {e.start})") from None


def _from_dir(directory: Path, books: int | None) -> list[Book]:
    if not directory.is_dir():
        raise DataError(f"data directory {str(directory)!r} does not exist")
    files = sorted(directory.glob("*.txt"))
    if not files:
        raise DataError(f"no .txt books in {str(directory)!r}")
    return [_read(f) for f in files[:books]]


def hub_text(data: str) -> HubText:
    """A --data name (pg19, wikitext-2, ...) or hf:NAME[:CONFIG][#COLUMN] as the dataset it names."""
    if data in NAMED_DATA:
        return NAMED_DATA[data]
    spec, _, column = data.removeprefix("hf:").partition("#")
    name, _, config = spec.partition(":")
    if not name:
        raise DataError(f"--data {data!r}: give hf:NAME[:CONFIG][#COLUMN], e.g. "
                        f"hf:Salesforce/wikitext:wikitext-2-raw-v1")
    return HubText(name, config or None, column or "text")


def _from_hub(dataset: HubText, books: int | None) -> list[Book]:
    """The dataset's test split, downloaded once into the Hugging Face cache (not streamed: a rerun reads the
    books from there, offline too); its first `books` rows, or all of them joined into one document."""
    how = "pass a local directory of .txt books with --data DIR" + (" (or set PG19_DIR)" if dataset.name == PG19_HUB
                                                                      else "")
    try:
        from datasets import load_dataset

        from huggingface_hub import constants

        if not (constants.is_offline_mode() or Path(dataset.name).exists()):
            check_hub_answers()  # at once, where datasets would retry a silent hub for half a minute
        split = dataset.split if books is None or dataset.joined else f"{dataset.split}[:{books}]"
        with quiet_hub_logs():
            rows = load_dataset(dataset.name, dataset.config, split=split)
    except Exception as e:  # offline, no `datasets`, hub errors: all mean the same thing to the user
        raise DataError(f"cannot load {dataset.label} through datasets ({first_line(e)}); {how} (a dataset read "
                        f"before is in the Hugging Face cache: HF_HUB_OFFLINE=1 reads it from there)") from None
    if dataset.column not in rows.column_names:
        raise DataError(f"{dataset.label} has no column {dataset.column!r} (its columns: "
                        f"{', '.join(rows.column_names)}); name the text column: hf:{dataset.label}#COLUMN")
    texts = rows[dataset.column]
    if dataset.joined:
        # WikiText's rows are its lines (headings, paragraphs, blank ones): one text, joined by blank lines as in
        # transformers' perplexity guide, the usual protocol for sliding-window PPL on WikiText.
        name = dataset.config or Path(dataset.name).name
        found = [Book(name, "\n\n".join(texts), f"{dataset.label}:{dataset.split}")]
    else:
        titles = rows[dataset.title_column] if dataset.title_column in rows.column_names else [None] * len(texts)
        urls = rows["url"] if "url" in rows.column_names else [None] * len(texts)
        found = []
        for i, (text, title, url) in enumerate(zip(texts, titles, urls)):
            if not (text or "").strip():
                continue  # an empty row is no book (it has no token to score)
            name = title or (url.rstrip("/").rsplit("/", 1)[-1] if url else f"{dataset.split}-{i}")
            found.append(Book(name, text, f"{dataset.label}:{url or name}"))
    if not found or not any(b.text.strip() for b in found):
        raise DataError(f"{dataset.label} returned no text in its {dataset.split} split; {how}")
    return found[:books]


def book_origin(source: str) -> str:
    """Where a book came from, for reports: the dataset, or the directory of its file."""
    if Path(source).is_file():
        return str(Path(source).parent)
    for dataset in NAMED_DATA.values():
        if source.startswith(dataset.label + ":"):
            return dataset.label
    return source.rsplit(":", 1)[0] if ":" in source else str(Path(source).parent)


def describe_books(books: list[Book], max_tokens: int | None) -> str:
    """E.g. '4 book(s) (10146, 10321, 10356, 10762) from ../shared/data/pg19-test, first 8192 tokens of each'."""
    limit = "full books" if max_tokens is None else f"first {max_tokens} tokens of each"
    return (f"{len(books)} book(s) ({', '.join(b.name for b in books)}) from "
            f"{', '.join(sorted({book_origin(b.source) for b in books}))}, {limit}")


def tokenize(book: Book, tokenizer, max_tokens: int | None = None) -> torch.Tensor:
    """LongTensor (n,) of the book's first max_tokens tokens (all when None); no BOS, as Pythia was trained."""
    ids = tokenizer.encode(book.text)
    return torch.tensor(ids[:max_tokens], dtype=torch.long)


def random_prompt(length: int, vocab_size: int, seed: int = 0) -> torch.Tensor:
    """LongTensor (length,) of uniformly random ids from a fixed seed: the prompt when no text is given."""
    return torch.randint(0, vocab_size, (length,), generator=torch.Generator().manual_seed(seed))


def check_max_tokens(max_tokens: int | None):
    if max_tokens is not None and max_tokens < 2:
        raise DataError(f"--max-tokens must be >= 2, got {max_tokens}")


def tokenized_books(books: list[Book], tokenizer, max_tokens: int | None = None) -> list[tuple[str, str, torch.Tensor]]:
    """(name, source, ids) of each book; a book left with fewer than 2 tokens has nothing to score."""
    check_max_tokens(max_tokens)
    out = []
    for book in books:
        ids = tokenize(book, tokenizer, max_tokens)
        if ids.numel() < 2:
            raise DataError(f"book {book.name!r} ({book.source}) has {ids.numel()} token(s)"
                            f"{' after --max-tokens' if max_tokens else ''}; at least 2 are needed to score one")
        out.append((book.name, book.source, ids))
    return out


def speed_prompts(lengths: list[int], books: list[Book], tokenizer, vocab_size: int) -> tuple[dict, str]:
    """length -> prompt ids (length,): the books' first tokens run together, else random ids (seed 0)."""
    need, parts, used = max(lengths), [], []
    for book in books:
        parts.append(tokenize(book, tokenizer, need - sum(p.numel() for p in parts)))
        used.append(book.name)
        if sum(p.numel() for p in parts) == need:
            ids = torch.cat(parts)
            return {n: ids[:n] for n in lengths}, f"text: the first {need} tokens of {', '.join(used)}"
    if books:
        print(f"note: the data has fewer than {need} tokens: random prompts instead", file=sys.stderr)
    return {n: random_prompt(n, vocab_size) for n in lengths}, "random token ids (seed 0)"
