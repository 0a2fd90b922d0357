"""The KV cache the model owns: per layer K (after rotary), V and each entry's original position.

`seen` counts the tokens the model has processed; it is the rotary position of the next token, whatever
a compressor has evicted. After compression each layer holds freshly allocated tensors with only the
kept entries, so the memory of evicted entries is really released.

A compressor runs at the end of the prefill (the first forward into an empty cache). With a
`decode_interval`, it also runs during decoding: whenever a forward leaves a layer with more than
budget + decode_interval entries (budget = the policy's keep_count), that layer is compressed back to the
budget by the same selection step, scored with the layer's most recent queries, which the cache keeps
(the policy's `decode_queries()` says how many it reads).
"""

from __future__ import annotations

import torch

from .config import PythiaConfig
from .timing import clock

# Decoding appends one token at a time; growing the buffers in chunks keeps that from copying every step.
GROWTH = 64


class KVCache:
    def __init__(self, config: PythiaConfig, batch_size: int = 1, dtype=torch.float32, device="cpu",
                 compressor=None, decode_interval: int | None = None, record_queries: bool = False):
        from .compressors import Compressor  # the compressors import the prefill, which imports this module

        if compressor is not None and not isinstance(compressor, Compressor):
            raise TypeError(f"compressor must be a minipythia Compressor (e.g. SnapKV()) or None, got {compressor!r}")
        self._query_window = check_decode_interval(compressor, decode_interval)  # before any forward
        if compressor is not None:
            compressor.for_model(config)
            compressor.check_input()
        if not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
        self.batch_size = batch_size
        self.n_heads = config.num_attention_heads
        self.head_size = config.head_size
        self.dtype, self.device = dtype, torch.device(device)
        self.compressor = compressor
        self.decode_interval = decode_interval
        self.record_queries = record_queries
        self._n_layers = config.num_hidden_layers
        self.reset()

    def reset(self):
        """Empties the cache for a new prompt: the next forward is a prefill at position 0 again (and is
        compressed). Reusing a cache without it continues the old sequence, at its positions."""
        n = self._n_layers
        self._keys: list[torch.Tensor | None] = [None] * n  # (B, nh, capacity, hs)
        self._values: list[torch.Tensor | None] = [None] * n
        self._positions: list[torch.Tensor | None] = [None] * n  # (B, nh, capacity) int64
        self._lengths = [0] * n  # entries in use per layer
        self._queries: list[torch.Tensor | None] = [None] * n  # (B, nh, <= _query_window, hs), decode_interval only
        # With record_queries, each layer's queries of the latest forward (what Prefill.record reads).
        self.recorded_queries: list[torch.Tensor | None] | None = [None] * n if self.record_queries else None
        self._new_positions: torch.Tensor | None = None  # positions of the forward being stored, see append
        self._float32_scratch: torch.Tensor | None = None  # see in_float32
        self.seen = 0
        self.nbytes_before_compression: int | None = None  # set by the compression at the end of the prefill
        self.compress_seconds = 0.0  # time spent compressing (scoring, top-k, gather), prefill and decoding

    @property
    def num_layers(self) -> int:
        return self._n_layers

    @property
    def in_prefill(self) -> bool:
        """True during the first forward into an empty cache, whose end always runs the compressor."""
        return self.seen == 0 and self.compressor is not None

    def __len__(self) -> int:
        """Entries kept per head in layer 0 (layers may differ when a compressor skips some)."""
        return self._lengths[0]

    def length(self, layer: int) -> int:
        return self._lengths[layer]

    def keys(self, layer: int) -> torch.Tensor:
        return self._keys[layer][:, :, : self._lengths[layer]]

    def values(self, layer: int) -> torch.Tensor:
        return self._values[layer][:, :, : self._lengths[layer]]

    def positions(self, layer: int) -> torch.Tensor:
        """Original token position of each kept entry: LongTensor (B, nh, n)."""
        return self._positions[layer][:, :, : self._lengths[layer]]

    def lengths(self, layer: int) -> torch.Tensor:
        """Entries each head of a layer holds: LongTensor (B, nh) (the same for every head here)."""
        return torch.full((self.batch_size, self.n_heads), self._lengths[layer], dtype=torch.long)

    def key_padding(self, layer: int) -> torch.Tensor | None:
        """Which of keys(layer) are entries, (B, nh, n), for caches whose heads hold different numbers of
        them (padded to the longest); None here: every one is."""
        return None

    @property
    def nbytes(self) -> int:
        """Bytes the cache's tensors really hold (allocated capacity, positions and kept queries included)."""
        return sum(self._layer_nbytes(layer) for layer in range(self.num_layers))

    def append(self, layer: int, k: torch.Tensor, v: torch.Tensor):
        """Stores k, v (B, nh, T, hs) at positions seen .. seen+T-1; returns all entries of the layer."""
        T = k.size(2)
        n = self._lengths[layer]
        buf = self._keys[layer]
        if buf is None or n + T > buf.size(2):
            # The prefill allocates exactly what it needs; later appends grow in chunks.
            self._grow(layer, n + T if buf is None else n + T + GROWTH)
        if layer == 0:  # every layer stores the same positions: one arange per forward, not per layer
            self._new_positions = torch.arange(self.seen, self.seen + T, device=self.device)
        self._keys[layer][:, :, n : n + T] = k
        self._values[layer][:, :, n : n + T] = v
        self._positions[layer][:, :, n : n + T] = self._new_positions
        self._lengths[layer] = n + T
        return self.keys(layer), self.values(layer)

    def _append_positions(self, layer: int, T: int):
        """Appends the positions of a forward's T tokens to a layer, growing its positions in chunks: for
        caches that store keys or values apart from the full-precision buffers (their own append)."""
        n = self._lengths[layer]
        self._positions[layer], _ = extended(self._positions[layer], n, None, T)
        if layer == 0:
            self._new_positions = torch.arange(self.seen, self.seen + T, device=self.device)
        self._positions[layer][:, :, n : n + T] = self._new_positions
        self._lengths[layer] = n + T

    def in_float32(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """k, v (B, nh, n, hs) copied into float32 scratch tensors that every layer reuses (grown by GROWTH):
        a fresh allocation of that size each step cost more than the copy. The cache's own tensors, and
        its memory figures, stay in the model's dtype."""
        B, H, n, D = k.shape
        scratch = self._float32_scratch
        if scratch is None or scratch.size(3) < n:
            scratch = self._float32_scratch = torch.empty(2, B, H, n + GROWTH, D, device=k.device)
        keys, values = scratch[0, :, :, :n], scratch[1, :, :, :n]
        keys.copy_(k)
        values.copy_(v)
        return keys, values

    def _grow(self, layer: int, capacity: int):
        B, H, D, n = self.batch_size, self.n_heads, self.head_size, self._lengths[layer]
        keys = torch.empty(B, H, capacity, D, dtype=self.dtype, device=self.device)
        values = torch.empty_like(keys)
        positions = torch.empty(B, H, capacity, dtype=torch.long, device=self.device)
        if n:
            keys[:, :, :n] = self.keys(layer)
            values[:, :, :n] = self.values(layer)
            positions[:, :, :n] = self.positions(layer)
        self._keys[layer], self._values[layer], self._positions[layer] = keys, values, positions

    def advance(self, num_tokens: int):
        """Called by the model once every layer has stored a forward's tokens."""
        self.seen += num_tokens

    def after_attention(self, layer: int, queries: torch.Tensor):
        """Called by each attention layer once it has used every cached entry, with its queries (B, nh, T, hs)
        after rotary: compressing here means the forward that triggers a compression still saw the full KV.

        The prefill is compressed to the policy's budget; with a decode_interval, any later forward that
        leaves the layer above budget + decode_interval entries compresses it back to the budget.
        """
        if self.recorded_queries is not None:
            self.recorded_queries[layer] = queries
        if self.compressor is None:
            return  # the plain decode path: no bookkeeping at all
        if self.decode_interval is not None:
            self._remember_queries(layer, queries)
        if self.in_prefill:
            self.compress(layer, queries)
        elif self.decode_interval is not None:
            n = self._lengths[layer]
            if n > self.compressor.keep_count(layer, n) + self.decode_interval:
                self._select(layer, self._queries[layer])

    def _remember_queries(self, layer: int, queries: torch.Tensor):
        """Keeps the layer's last `_query_window` queries, copied: a view would keep the forward's whole
        QKV tensor alive."""
        past = self._queries[layer]
        recent = queries if past is None else torch.cat((past, queries), dim=2)  # (B, nh, n_past + T, hs)
        self._queries[layer] = recent[:, :, max(0, recent.size(2) - self._query_window) :].clone()

    def compress(self, layer: int, queries: torch.Tensor):
        """Compresses one layer at the end of its prefill attention; `queries` (B, nh, T, hs) are the
        prefill's, after rotary. Records what the full cache held before, for the memory figures."""
        if layer == 0:  # layers are compressed in order, each right after its prefill attention
            self.nbytes_before_compression = 0
        self.nbytes_before_compression += self._layer_nbytes(layer)
        self._select(layer, queries)

    def _select(self, layer: int, queries: torch.Tensor):
        """The one shared selection step, at the prefill and during decoding: each policy only scores
        entries; here the top keep_count per (batch, head) are kept, in position order, in new tensors of
        exactly that size. `queries` are those of the layer's last entries (all of them at the prefill)."""
        start = clock(self.device)
        n = self._lengths[layer]
        keep = self.compressor.keep_count(layer, n)
        if keep < n:
            keys, values = self.keys(layer), self.values(layer)
            scores = self.compressor.score(layer, keys, values, queries)  # (B, nh, n)
            idx = scores.topk(keep, dim=-1).indices.sort(dim=-1).values  # (B, nh, keep)
            self.keep(layer, idx, self.compressor.kept_values(layer, keys, values, queries, idx))
        self.compress_seconds += clock(self.device) - start

    def keep(self, layer: int, idx: torch.Tensor, values: torch.Tensor | None = None):
        """Keeps only the entries at indices idx (B, nh, k) of a layer, in freshly allocated tensors; with
        `values` (B, nh, k, hs), those are the kept entries' values (a policy that merges evicted entries)."""
        gather_idx = idx.unsqueeze(-1).expand(-1, -1, -1, self.head_size)  # (B, nh, k, hs)
        self._keys[layer] = self.keys(layer).gather(2, gather_idx)
        self._values[layer] = (self.values(layer).gather(2, gather_idx) if values is None
                               else values.to(self.dtype).contiguous())
        self._positions[layer] = self.positions(layer).gather(2, idx)
        self._lengths[layer] = idx.size(-1)

    def _layer_nbytes(self, layer: int) -> int:
        tensors = (self._keys[layer], self._values[layer], self._positions[layer], self._queries[layer])
        return sum(t.untyped_storage().nbytes() for t in tensors if t is not None)


def extended(buffer: torch.Tensor, length: int, new: torch.Tensor | None, count: int | None = None
             ) -> tuple[torch.Tensor, int]:
    """A buffer (B, nh, capacity, ...) whose first `length` entries are in use, with room for `count` more
    (grown by GROWTH when it is full) and, when given, `new` (B, nh, count, ...) written after them.
    Returns the buffer (the same one when it had room) and the new length."""
    count = new.size(2) if new is not None else count
    if buffer.size(2) < length + count:
        grown = torch.empty(*buffer.shape[:2], length + count + GROWTH, *buffer.shape[3:], dtype=buffer.dtype,
                            device=buffer.device)
        grown[:, :, :length] = buffer[:, :, :length]
        buffer = grown
    if new is not None:
        buffer[:, :, length : length + count] = new
    return buffer, length + count


def check_decode_interval(compressor, decode_interval: int | None) -> int:
    """How many of each layer's newest queries a cache compressing with `compressor` during decoding at this
    interval keeps (0 with decode_interval None: no decode-time compression); raises ValueError when it
    cannot. The CLIs call it before loading a model."""
    if decode_interval is None:
        return 0
    if compressor is None:
        raise ValueError("decode_interval needs a compressor: it is the policy that says what to keep")
    if not isinstance(decode_interval, int) or isinstance(decode_interval, bool):
        raise ValueError(f"decode_interval must be an integer, got {decode_interval!r}")
    if decode_interval < 0:
        raise ValueError(f"decode_interval must be >= 0 (entries allowed above the budget before compressing "
                         f"again), got {decode_interval}")
    return compressor.decode_queries()
