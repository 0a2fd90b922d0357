"""KV-cache compression policies. A new policy is one short file: a `Compressor` dataclass with
`keep_count()` and `score()`, registered in COMPRESSORS below."""

from .base import Compressor
from .knorm import KnormPress
from .none import NoCompression
from .snapkv import SnapKV

COMPRESSORS: dict[str, type[Compressor]] = {cls.name: cls for cls in (NoCompression, KnormPress, SnapKV)}

__all__ = ["COMPRESSORS", "Compressor", "KnormPress", "NoCompression", "SnapKV"]
