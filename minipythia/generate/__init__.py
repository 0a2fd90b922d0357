"""Autoregressive generation with the native (optionally compressed) KV cache.

`python -m minipythia.generate` is the command line (`__main__.py`). This is a package, imported by
`minipythia` itself, so that importing the command line never rebinds `minipythia.generate`, the function.
"""

from __future__ import annotations

import statistics
import warnings
from dataclasses import dataclass, field

import torch

from ..compressors import Compressor
from ..model import Pythia
from ..timing import clock

WARMUP_STEPS = 3  # decode steps left out of TPOT: the first ones pay for allocator and cache growth


@dataclass
class Generation:
    tokens: list[int]  # the new tokens only
    ttft_s: float  # prefill + compression + choosing the first token
    compress_s: float = 0.0  # the compression's share of ttft_s
    step_s: list[float] = field(default_factory=list)  # wall time of each later decode step
    kv_bytes_prefill: int = 0  # what the full cache held at the end of the prefill, before compression
    kv_bytes_compressed: int = 0  # right after compression (equal to the above without a compressor)
    kv_bytes_end: int = 0  # with a decode_interval, bounded by budget + interval (+ the buffers' growth margin)
    kept_after_prefill: int = 0  # entries per head left in layer 0 by the compression
    kept_end: int = 0  # entries per head in layer 0 at the end

    @property
    def tpot_s(self) -> float:
        """Median time per output token after the warm-up steps (nan when too few tokens were made)."""
        steps = self.step_s[WARMUP_STEPS:] or self.step_s
        return statistics.median(steps) if steps else float("nan")

    @property
    def tokens_per_s(self) -> float:
        return 1.0 / self.tpot_s


def sample(logits: torch.Tensor, temperature: float = 0.0, top_k: int | None = None, top_p: float | None = None,
           generator: torch.Generator | None = None) -> int:
    """Picks the next token from logits (vocab,): greedy at temperature 0, else top-k / nucleus sampling."""
    if temperature == 0:
        return int(logits.argmax())
    logits = logits.float() / temperature
    if top_k is not None and top_k < logits.numel():
        kth = logits.topk(top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = logits.sort(descending=True)
        cumulative = sorted_logits.softmax(-1).cumsum(-1)
        # Drop a token once the ones before it already cover top_p; the most likely token always stays.
        drop = cumulative - sorted_logits.softmax(-1) >= top_p
        logits = logits.scatter(0, order, sorted_logits.masked_fill(drop, float("-inf")))
    return int(torch.multinomial(logits.softmax(-1), 1, generator=generator))


def check_sampling(temperature: float, top_k: int | None, top_p: float | None, max_new_tokens: int,
                   seed: int | None = None):
    def number(value, name):
        if not isinstance(value, (int, float)) or isinstance(value, bool) or value != value:
            raise ValueError(f"{name} must be a number, got {value!r}")

    number(temperature, "temperature")
    if not 0 <= temperature < float("inf"):
        raise ValueError(f"temperature must be >= 0 (0 = greedy), got {temperature}")
    if top_k is not None and (not isinstance(top_k, int) or isinstance(top_k, bool) or top_k < 1):
        raise ValueError(f"top_k must be an integer >= 1, got {top_k!r}")
    if top_p is not None:
        number(top_p, "top_p")
        if not 0.0 < top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {top_p}")
    if temperature == 0 and (top_k is not None or top_p is not None or seed is not None):
        raise ValueError("top_k, top_p and seed are about sampling, which temperature 0 (greedy) does not do: give a "
                         "temperature > 0 or leave them out")
    if seed is not None and (not isinstance(seed, int) or isinstance(seed, bool) or seed < 0):
        raise ValueError(f"seed must be an integer >= 0, got {seed!r}")
    if not isinstance(max_new_tokens, int) or isinstance(max_new_tokens, bool) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be an integer >= 1, got {max_new_tokens!r}")


def prompt_tensor(prompt_ids) -> torch.Tensor:
    """A prompt (a list or 1-D tensor of token ids) as a 1-D LongTensor; ValueError for anything else."""
    ids = torch.as_tensor(prompt_ids)
    if ids.numel() == 0:
        raise ValueError("the prompt is empty: give at least one token")
    one_row = ids.dim() <= 1 or (ids.dim() == 2 and ids.size(0) == 1)
    if ids.is_floating_point() or ids.is_complex() or ids.dtype == torch.bool or not one_row:
        raise ValueError(f"the prompt must be token ids, a list of ints or a 1-D integer tensor, got "
                         f"{ids.dtype} of shape {tuple(ids.shape)}")
    return ids.long().flatten()


def nonfinite_error(model: Pythia, ids: torch.Tensor) -> ValueError:
    """The error that stops generation at non-finite logits, saying where a forward of the tokens so far
    (ids, 1-D) first goes wrong."""
    return ValueError(f"the logits after {ids.numel()} tokens are not finite (NaN or Inf): they first appear in "
                      f"{model.locate_nonfinite(ids.view(1, -1))}")


@torch.inference_mode()
def generate(model: Pythia, prompt_ids, max_new_tokens: int = 64, temperature: float = 0.0,
             top_k: int | None = None, top_p: float | None = None, seed: int | None = None,
             compressor: Compressor | None = None, eos_id: int | None = None, on_token=None,
             decode_interval: int | None = None) -> Generation:
    """Generates up to max_new_tokens after prompt_ids (a list or 1-D tensor of ids).

    The prompt is prefilled in one forward, then compressed; the first token comes from full-KV logits,
    later ones see only the kept entries. With a decode_interval the compressor also runs during decoding,
    whenever a layer holds more than its budget + decode_interval entries (see KVCache). Stops early at
    eos_id. on_token(id) is called as each arrives.
    """
    check_sampling(temperature, top_k, top_p, max_new_tokens, seed)
    ids = prompt_tensor(prompt_ids)
    limit = model.config.max_position_embeddings
    if ids.numel() + max_new_tokens > limit:
        warnings.warn(f"prompt ({ids.numel()} tokens) + {max_new_tokens} new tokens exceed the {limit} positions "
                      f"this model was trained on (its max_position_embeddings); quality degrades past them")
    device = model.embed_in.weight.device
    ids = ids.to(device)
    generator = torch.Generator(device=device).manual_seed(seed) if seed is not None else None
    cache = model.new_cache(batch_size=1, compressor=compressor, decode_interval=decode_interval)

    start = clock(device)
    logits = model(ids[None], cache=cache, last_only=True)
    if not torch.isfinite(logits).all():
        raise nonfinite_error(model, ids)
    token = sample(logits[0, -1], temperature, top_k, top_p, generator)
    result = Generation(tokens=[token], ttft_s=clock(device) - start,
                        compress_s=cache.compress_seconds, kept_after_prefill=len(cache),
                        kv_bytes_prefill=cache.nbytes_before_compression or cache.nbytes,
                        kv_bytes_compressed=cache.nbytes)
    if on_token:
        on_token(token)
    step_input = torch.empty(1, 1, dtype=torch.long, device=device)
    while len(result.tokens) < max_new_tokens and token != eos_id:
        start = clock(device)
        step_input.fill_(token)
        logits = model(step_input, cache=cache)
        if not torch.isfinite(logits).all():
            raise nonfinite_error(model, torch.cat((ids, torch.tensor(result.tokens, device=device))))
        token = sample(logits[0, -1], temperature, top_k, top_p, generator)
        result.step_s.append(clock(device) - start)
        result.tokens.append(token)
        if on_token:
            on_token(token)
    result.kv_bytes_end, result.kept_end = cache.nbytes, len(cache)
    return result
