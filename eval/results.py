"""Result files: JSON lines appended as each record finishes (an interrupted run loses nothing), JSON
documents replaced whole, and a lock per results folder.

Everything is strict JSON: NaN and Infinity are never written (they are refused, as a bug), and a line that is
not a complete, valid record (cut off by a kill, edited by hand) is moved to FILE.quarantine with a warning
instead of being read, so that a rerun computes it again.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

from filelock import FileLock, Timeout

from minipythia.bounded import shown


def _no_constants(name: str):
    raise ValueError(f"{name} is not a number JSON allows")


def read_jsonl(path: str | Path, required: tuple[str, ...] = ()) -> list[dict]:
    """Every valid record of a file (none when it is missing): a JSON object holding the `required` keys.
    Invalid lines are moved to PATH.quarantine, each with a warning on stderr."""
    path = Path(path)
    if not path.is_file():
        return []
    records, invalid = [], []
    for line in path.read_text().splitlines():
        if not line.strip():
            continue
        try:
            record = json.loads(line, parse_constant=_no_constants)
            if not isinstance(record, dict):
                raise ValueError(f"a {type(record).__name__}, not a record")
            missing = [k for k in required if k not in record]
            if missing:
                raise ValueError(f"no {', '.join(missing)}")
        except ValueError as e:  # json.JSONDecodeError is one
            invalid.append((line, str(e).splitlines()[0]))
            continue
        records.append(record)
    if invalid:
        quarantine = path.with_name(path.name + ".quarantine")
        with quarantine.open("a") as f:
            f.writelines(line + "\n" for line, _ in invalid)
        write_text(path, "".join(json.dumps(r, allow_nan=False) + "\n" for r in records))
        for line, why in invalid:
            print(f"warning: {path}: an invalid record ({why}: {line[:60]!r}) moved to {quarantine.name}; "
                  f"a rerun computes it again", file=sys.stderr)
    return records


def append_jsonl(path: str | Path, record: dict):
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    line = json.dumps(record, allow_nan=False)  # before anything is written: a NaN is a bug, never a result
    # A run killed mid-write leaves a line without its newline: start on a fresh line after it.
    broken = False
    if path.is_file() and path.stat().st_size:
        with path.open("rb") as f:
            f.seek(-1, 2)
            broken = f.read(1) != b"\n"
    with path.open("a") as f:
        f.write(("\n" if broken else "") + line + "\n")


class OutsideFolder(ValueError):
    """A results folder that names, or links to, something outside itself (a crafted sweep.json, a symlink)."""


def contained(root: Path, relative, source: str) -> Path:
    """root / relative, for a folder a results file names (`source`: which file and field): a relative path
    without '..' whose every part is inside root, or OutsideFolder. With check_no_links_out(root) this keeps
    everything report and resume read or write inside root."""
    parts = Path(relative).parts if isinstance(relative, str) else ()
    if not parts or Path(relative).is_absolute() or ".." in parts or \
            not (root / relative).resolve().is_relative_to(root.resolve()):
        raise OutsideFolder(f"{source} names {shown(relative)}, which is not a folder inside {root}; refusing to "
                            f"read or write it (restore the file or delete the results folder)")
    return root / relative


def check_no_links_out(root: Path):
    """OutsideFolder if a symlink anywhere in the results folder leads outside it: reading through it would
    report someone else's file, writing (a quarantine, a rewritten record) would change it."""
    base = root.resolve()
    for folder, subfolders, files in os.walk(root):  # symlinked subfolders are listed, not entered
        for name in subfolders + files:
            path = Path(folder) / name
            if path.is_symlink() and not path.resolve().is_relative_to(base):
                raise OutsideFolder(f"{path} is a link to {path.resolve()}, outside the results folder {root}; "
                                    f"refusing to read or write through it (remove the link)")


def read_json(path: str | Path):
    """A JSON document this package wrote (sweep.json, ...); a damaged one is a ValueError naming it."""
    try:
        return json.loads(Path(path).read_text(), parse_constant=_no_constants)
    except (ValueError, UnicodeDecodeError) as e:
        raise ValueError(f"{path} is damaged ({str(e).splitlines()[0]}); delete the folder's results or restore "
                         f"the file") from None


def write_json(path: str | Path, document) -> None:
    write_text(path, json.dumps(document, indent=2, allow_nan=False))


def write_text(path: str | Path, text: str) -> None:
    """Replaces a file whole: written beside it, then renamed over it, so a kill leaves the old or the new."""
    path = Path(path)
    partial = path.with_name(f".{path.name}.{os.getpid()}.partial")
    partial.write_text(text)
    partial.replace(path)


# One lock object per folder and process, so that holding it again (the CLI, then the sweep it runs) nests.
_locks: dict[Path, FileLock] = {}


class FolderBusy(ValueError):
    pass


class locked:
    """`with locked(out):` holds the results folder's lock (OUT/.lock) while a run writes into it; another
    process gets FolderBusy at once (a ValueError: one line, exit code 2). Re-entrant within a process."""

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)
        key = self.folder.resolve()
        self.lock = _locks.setdefault(key, FileLock(key / ".lock", timeout=0))

    def __enter__(self):
        try:
            self.lock.acquire()
        except Timeout:
            raise FolderBusy(f"another run is writing into {self.folder} (it holds {self.folder / '.lock'}); wait "
                             f"for it to finish, or give another --out") from None
        return self

    def __exit__(self, *exc):
        self.lock.release()
