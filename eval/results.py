"""Results as JSON lines: one record a line, appended as each finishes, so an interrupted run loses nothing."""

from __future__ import annotations

import json
from pathlib import Path


def read_jsonl(path: str | Path) -> list[dict]:
    """Every complete record of a file (none when it is missing); a line cut off by an interruption is skipped."""
    path = Path(path)
    if not path.is_file():
        return []
    records = []
    for line in path.read_text().splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return records


def append_jsonl(path: str | Path, record: dict):
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # A run killed mid-write leaves a line without its newline: start on a fresh line after it.
    broken = False
    if path.is_file() and path.stat().st_size:
        with path.open("rb") as f:
            f.seek(-1, 2)
            broken = f.read(1) != b"\n"
    with path.open("a") as f:
        f.write(("\n" if broken else "") + json.dumps(record) + "\n")
