"""A prefill recorded once and replayed into a cache for any compressor.

The prefill's attention sees the full KV whatever the compressor, so its keys, values and queries do not
depend on it: a sweep of many compressors runs the prefill's forward once and replays it into one cache
per compressor, which then holds exactly what that compressor's own prefill would have left.
`replay` makes the calls the model's forward makes, in the same order, so the cache decides what to
compress exactly as it does in a forward.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .kv import KVCache


@dataclass
class Prefill:
    keys: list[torch.Tensor]  # per layer (B, nh, T, hs), after rotary
    values: list[torch.Tensor]  # per layer (B, nh, T, hs)
    queries: list[torch.Tensor]  # per layer (B, nh, T, hs), after rotary
    logits: torch.Tensor  # (B, 1, vocab) with last_only, else (B, T, vocab)
    input_ids: torch.Tensor  # (B, T): what was prefilled (Compressor.prepare reads it)

    @property
    def num_tokens(self) -> int:
        return self.keys[0].size(2)

    @classmethod
    @torch.no_grad()  # not inference_mode: what it records may meet tensors made outside it (the oracle's)
    def record(cls, model, input_ids: torch.Tensor, last_only: bool = True) -> "Prefill":
        """One uncompressed forward of input_ids (B, T) into an empty cache, recording every layer."""
        cache = model.new_cache(input_ids.size(0), record_queries=True)
        logits = model(input_ids, cache=cache, last_only=last_only)
        layers = range(cache.num_layers)
        return cls([cache.keys(i) for i in layers], [cache.values(i) for i in layers],
                    [cache.recorded_queries[i] for i in layers], logits, input_ids)

    def row(self, b: int) -> "Prefill":
        """The prefill of batch row b alone (views, no copies)."""
        return Prefill([k[b : b + 1] for k in self.keys], [v[b : b + 1] for v in self.values],
                       [q[b : b + 1] for q in self.queries], self.logits[b : b + 1], self.input_ids[b : b + 1])

    def replay(self, model, compressor=None, decode_interval: int | None = None) -> KVCache:
        """The cache a prefill of the same tokens with this compressor (and decode_interval) would have left."""
        cache = model.new_cache(self.keys[0].size(0), compressor, decode_interval)
        if compressor is not None:
            compressor.prepare(model, Prompt(model, self.input_ids, prefill=self))
        self.fill(cache)
        return cache

    def fill(self, cache: KVCache):
        """Makes, into an empty cache, the calls the model's forward makes (append, after_attention, advance)."""
        for layer, (k, v, q) in enumerate(zip(self.keys, self.values, self.queries)):
            cache.append(layer, k, v)
            cache.after_attention(layer, q)
        cache.advance(self.num_tokens)


class Prompt:
    """What Compressor.prepare gets before a prefill: the prompt's ids, and its uncompressed prefill, recorded
    the first time a policy asks for it (KVzip's reconstruction reads its cache, DuoAttention's model-wide
    ranking its keys and queries: every layer, which a layer's compression cannot wait for). Once recorded, the
    model's forward fills the cache from it instead of running the prompt a second time; a replay hands over
    the prefill it has."""

    def __init__(self, model, input_ids: torch.Tensor, last_only: bool = True, prefill: Prefill | None = None):
        self.model, self.input_ids, self.last_only = model, input_ids, last_only
        self._prefill = prefill

    @property
    def length(self) -> int:
        return self.input_ids.size(1)

    @property
    def prefill(self) -> Prefill:
        if self._prefill is None:
            self._prefill = Prefill.record(self.model, self.input_ids, self.last_only)
        return self._prefill

    @property
    def recorded(self) -> bool:
        return self._prefill is not None
