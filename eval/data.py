"""Eval text: PG-19 books from a local directory of .txt files, listed files, or the Hugging Face mirror.

`--data pg19` reads $PG19_DIR when it is set, else the parquet mirror of the PG-19 test split through
`datasets` (streamed, so `--books N` fetches only N books). Offline, point --data at a directory.
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
    if data == ["pg19"]:
        local = os.environ.get("PG19_DIR")
        found = _from_dir(Path(local), books) if local else _from_hub(books)
    elif len(data) == 1 and Path(data[0]).is_dir():
        found = _from_dir(Path(data[0]), books)
    else:
        for f in data:
            if Path(f).is_dir():
                raise DataError(f"--data takes one directory or a list of files; {f!r} is a directory among others")
            if not Path(f).is_file():
                raise DataError(f"data {f!r} does not exist (--data takes 'pg19', a directory of .txt books, "
                                f"or .txt files)")
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


def _from_hub(books: int | None) -> list[Book]:
    try:
        from datasets import load_dataset

        check_hub_answers()  # at once, where datasets would retry a silent hub for half a minute
        with quiet_hub_logs():
            rows = load_dataset(PG19_HUB, split="test", streaming=True)
            found = []
            for row in rows:
                if books is not None and len(found) == books:
                    break
                name = row.get("short_book_title") or row["url"].rstrip("/").rsplit("/", 1)[-1]
                found.append(Book(name, row["text"], f"{PG19_HUB}:{row.get('url', name)}"))
    except Exception as e:  # offline, no `datasets`, hub errors: all mean the same thing to the user
        reason = first_line(e)
        raise DataError(f"cannot load PG-19 ({PG19_HUB}) through datasets ({reason}); pass a local directory "
                        f"of .txt books with --data DIR (or set PG19_DIR)") from None
    if not found:
        raise DataError(f"{PG19_HUB} returned no books")
    return found


def book_origin(source: str) -> str:
    """Where a book came from, for reports: the dataset, or the directory of its file."""
    return PG19_HUB if source.startswith(PG19_HUB + ":") else str(Path(source).parent)


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
