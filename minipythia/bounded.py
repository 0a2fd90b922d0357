"""What an error message quotes of its input, bounded: a hostile input (a YAML alias bomb that expands to 10^9
strings, a megabyte-long value) is refused in one short line instead of being printed whole."""

from __future__ import annotations

import reprlib

_SHOWN = reprlib.Repr()
_SHOWN.maxlevel, _SHOWN.maxlist, _SHOWN.maxtuple, _SHOWN.maxdict, _SHOWN.maxset = 3, 6, 6, 6, 6
_SHOWN.maxstring, _SHOWN.maxother, _SHOWN.maxlong = 80, 80, 40


def shown(value) -> str:
    """repr(value) cut to about 200 characters, without building the whole repr of a huge or shared structure."""
    return _SHOWN.repr(value)


def first_line(error: BaseException, limit: int = 200) -> str:
    """An exception's first line, at most `limit` characters: what an error message quotes of it."""
    text = str(error).strip()
    line = text.splitlines()[0] if text else type(error).__name__
    return line if len(line) <= limit else line[:limit] + "..."
