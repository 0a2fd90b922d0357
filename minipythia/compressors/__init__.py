"""KV-cache compression policies. A new policy is one short file: a `Compressor` dataclass with
`keep_count()` and `score()`, registered in COMPRESSORS below."""

from .base import Compressor
from .h2o import H2O
from .knorm import KnormPress
from .none import NoCompression
from .oracle import Oracle, oracle_future_queries
from .pyramidkv import PyramidKV
from .random_eviction import RandomEviction
from .snapkv import SnapKV
from .streaming_llm import StreamingLLM
from .tova import TOVA

COMPRESSORS: dict[str, type[Compressor]] = {
    cls.name: cls
    for cls in (NoCompression, KnormPress, SnapKV, StreamingLLM, H2O, TOVA, RandomEviction, PyramidKV, Oracle)
}

__all__ = ["COMPRESSORS", "Compressor", "H2O", "KnormPress", "NoCompression", "Oracle", "PyramidKV", "RandomEviction",
           "SnapKV", "StreamingLLM", "TOVA", "oracle_future_queries"]
