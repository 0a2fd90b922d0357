"""Token-by-token perplexity (StreamingLLM-style): a book fed one token at a time through a cache that
compresses during decoding.

Each token's forward gives the logits that predict the next one, so every NLL comes from a cache that holds
at most budget + decode_interval entries per head (see KVCache). Rotary positions are the tokens' true
positions and Pythia was trained on max_position_embeddings of them, so every config restarts with an empty
cache every `ctx_len` tokens: segments of ctx_len tokens overlapping by one, so that each token after the
book's first is scored exactly once, and by every config from the same tokens. Without a compressor this is
full-KV teacher forcing within each segment: the NLLs of one forward over the segment.
"""

from __future__ import annotations

import sys

import torch
import torch.nn.functional as F
from tqdm import tqdm

from minipythia import Compressor
from minipythia.kv import check_decode_interval
from minipythia.timing import clock

from .nll import nonfinite_nll


def check_stream_args(mode: str, stride: int | None, compressor: Compressor, decode_interval: int | None):
    """Fails fast on options that do not belong to the chosen `python -m eval ppl --mode`."""
    if mode == "window" and decode_interval is not None:
        raise ValueError("--decode-interval applies to --mode stream: a window's targets are scored in one "
                         "forward, so nothing is decoded")
    if mode == "stream" and stride is not None:
        raise ValueError("--stride applies to --mode window: a stream scores every token, one at a time")
    if mode == "stream" and decode_interval is None and compressor.name != "none":
        raise ValueError("--mode stream compresses during decoding: give --decode-interval N (e.g. 64), the "
                         "entries a layer may hold above its budget before it is compressed again")
    check_decode_interval(compressor, decode_interval)


def segments(n: int, ctx_len: int):
    """(begin, end) of each stream segment over n tokens: ctx_len tokens, overlapping by one, so that the
    targets ids[begin+1:end] of all segments are tokens 1 .. n-1, each once."""
    if ctx_len < 2:
        raise ValueError(f"ctx_len must be >= 2, got {ctx_len}")
    for begin in range(0, max(n - 1, 0), ctx_len - 1):
        yield begin, min(begin + ctx_len, n)


@torch.inference_mode()
def stream_nll(model, ids: torch.Tensor, ctx_len: int, compressor: Compressor | None = None,
               decode_interval: int | None = None, progress=None) -> torch.Tensor:
    """Per-token NLLs (float32) of tokens 1 .. n-1 of ids (1-D), each from a forward of the token before it
    through the cache; a compressor other than none runs during decoding with this decode_interval.
    `progress` (a tqdm bar) advances by one per token."""
    if ids.dim() != 1:
        raise ValueError(f"ids must be a 1-D LongTensor, got shape {tuple(ids.shape)}")
    device = model.embed_in.weight.device
    ids = ids.to(device)
    if compressor is None or compressor.name == "none":
        compressor, decode_interval = None, None  # full KV: the plain cache
    nll = torch.empty(max(ids.numel() - 1, 0))
    step_input = torch.empty(1, 1, dtype=torch.long, device=device)
    for begin, end in segments(ids.numel(), ctx_len):
        cache = model.new_cache(1, compressor, decode_interval)
        for t in range(begin, end - 1):
            step_input.fill_(ids[t])
            logits = model(step_input, cache=cache)  # (1, 1, vocab)
            nll[t] = F.cross_entropy(logits[0].float(), ids[t + 1 : t + 2])
            if progress is not None:
                progress.update()
        if not torch.isfinite(nll[begin : end - 1]).all():
            raise nonfinite_nll(model, ids[begin:end].view(1, -1), f"in the stream segment of tokens {begin}..{end}")
    return nll


def stream_nlls(model, ids: torch.Tensor, ctx_len: int, compressors: list[Compressor], decode_interval: int | None,
                desc: str | None = None, seconds: list[float] | None = None) -> list[torch.Tensor]:
    """stream_nll of each compressor (nothing can be shared: every forward depends on the cache), the time
    of each added to `seconds`; `desc` shows a tqdm bar over all their tokens."""
    results = []
    with tqdm(total=len(compressors) * max(ids.numel() - 1, 0), desc=desc, disable=desc is None, unit="tok",
              file=sys.stderr) as progress:
        for i, compressor in enumerate(compressors):
            device = model.embed_in.weight.device
            start = clock(device)
            results.append(stream_nll(model, ids, ctx_len, compressor, decode_interval, progress))
            if seconds is not None:
                seconds[i] += clock(device) - start
    return results
