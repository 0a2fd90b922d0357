"""The KV cache the model owns: a store per layer (minipythia.kv.store) and what is common to all of them.

`seen` counts the tokens the model has processed; it is the rotary position of the next token, whatever a
compressor has evicted. Every store keeps each entry's original position. After compression a layer's store
holds freshly allocated tensors with only the kept entries, so the memory of evicted entries is really released.

A compressor runs at the end of the prefill (the first forward into an empty cache), layer by layer right after
the layer's attention, which thus saw the full KV. What a layer's store becomes follows from what the policy
declares for that layer: its `select` returns indices (every head the same count: a DenseStore) or a mask
(head-wise budgets: a RaggedStore); its `holds` may turn that into a kind of its own (pruned key channels, a
PrunedKeysStore); `kv_bits` wraps whatever it became in a QuantizedStore. With a `decode_interval`, it also runs during decoding:
whenever a forward leaves a layer with more than budget + decode_interval entries (budget = the policy's
keep_count), that layer is compressed back to the budget by the same selection, scored with the layer's most
recent queries, which the cache keeps (the policy's `decode_queries()` says how many it reads).

The cache knows no policy by name, and none of their classes: a compressor is anything with that interface.
"""

from __future__ import annotations

import torch

from ..timing import clock
from .dense import DenseStore
from .quantized import QuantizedStore
from .ragged import RaggedStore
from .store import GROWTH, Store


class KVCache:
    def __init__(self, config, batch_size: int = 1, dtype=torch.float32, device="cpu", compressor=None,
                 decode_interval: int | None = None, record_queries: bool = False):
        self._query_window = check_decode_interval(compressor, decode_interval)  # before any forward
        if compressor is not None:
            compressor.for_model(config)
            compressor.check_input()
            fixed = [layer for layer in range(config.num_hidden_layers)
                     if compressor.headwise_at(layer) or compressor.prunes_keys_at(layer)]
            if decode_interval is not None and fixed:
                raise ValueError(f"{compressor.name} cannot compress during decoding: it sets heads' budgets or key "
                                 f"channels once, at the prefill (layer {fixed[0]}); leave decode_interval unset")
        if not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
        self.batch_size = batch_size
        self.n_heads = config.num_attention_heads
        self.head_size = config.head_size
        self.dtype, self.device = dtype, torch.device(device)
        self.compressor = compressor
        self.config = config
        self.decode_interval = decode_interval
        self.record_queries = record_queries
        self._n_layers = config.num_hidden_layers
        self.reset()

    def reset(self):
        """Empties the cache for a new prompt: the next forward is a prefill at position 0 again (and is
        compressed). Reusing a cache without it continues the old sequence, at its positions."""
        n = self._n_layers
        self.stores: list[Store] = [DenseStore.empty(self.batch_size, self.n_heads, self.head_size, self.dtype,
                                                     self.device) for _ in range(n)]
        self._queries: list[torch.Tensor | None] = [None] * n  # (B, nh, <= _query_window, hs), decode_interval only
        # With record_queries, each layer's queries of the latest forward (what Prefill.record reads).
        self.recorded_queries: list[torch.Tensor | None] | None = [None] * n if self.record_queries else None
        self._new_positions: torch.Tensor | None = None  # positions of the forward being stored, see append
        self._float32_scratch: torch.Tensor | None = None  # see in_float32
        self.seen = 0
        self.nbytes_before_compression: int | None = None  # set by the compression at the end of the prefill
        self.compress_seconds = 0.0  # time spent compressing (scoring, top-k, gather), prefill and decoding
        self._merged = False  # whether a policy set its kept entries' values (kept_values)

    @property
    def num_layers(self) -> int:
        return self._n_layers

    @property
    def in_prefill(self) -> bool:
        """True during the first forward into an empty cache, whose end always runs the compressor."""
        return self.seen == 0 and self.compressor is not None

    def __len__(self) -> int:
        """Slots per head in layer 0 (layers may differ when a compressor skips some; heads too, when a
        head-wise policy gave them budgets of their own: then the longest)."""
        return self.stores[0].length

    def length(self, layer: int) -> int:
        return self.stores[layer].length

    def keys(self, layer: int) -> torch.Tensor:
        return self.stores[layer].read()[0]

    def values(self, layer: int) -> torch.Tensor:
        return self.stores[layer].read()[1]

    def positions(self, layer: int) -> torch.Tensor:
        """Original token position of each slot: LongTensor (B, nh, n), -1 at padding."""
        return self.stores[layer].positions()

    def lengths(self, layer: int) -> torch.Tensor:
        """Entries each head of a layer holds: LongTensor (B, nh)."""
        return self.stores[layer].lengths()

    def key_padding(self, layer: int) -> torch.Tensor | None:
        """Which of keys(layer) are entries, (B, nh, n), for a layer whose heads hold different numbers of
        them (padded to the longest); None when every slot is one."""
        return self.stores[layer].padding()

    @property
    def headwise(self) -> bool:
        """Whether some layer's heads hold different numbers of entries: attention then reads them padded to the
        batch's longest head, so a row's figures may round differently with other rows beside it."""
        return any(isinstance(store, RaggedStore) for store in self.stores)

    @property
    def holds_copies(self) -> bool:
        """Whether every layer holds exact copies of entries it was given, laid out as they came: two caches of
        one prefill that kept the same positions are then the same cache."""
        return all(type(store) is DenseStore for store in self.stores) and not self._merged

    @property
    def nbytes(self) -> int:
        """Bytes the cache's tensors really hold (allocated capacity, positions and kept queries included)."""
        return sum(self._layer_nbytes(layer) for layer in range(self.num_layers))

    def _layer_nbytes(self, layer: int) -> int:
        queries = self._queries[layer]
        return self.stores[layer].nbytes + (queries.untyped_storage().nbytes() if queries is not None else 0)

    def append(self, layer: int, k: torch.Tensor, v: torch.Tensor):
        """Stores k, v (B, nh, T, hs) at positions seen .. seen+T-1; returns all entries of the layer."""
        if layer == 0:  # every layer stores the same positions: one arange per forward, not per layer
            self._new_positions = torch.arange(self.seen, self.seen + k.size(2), device=self.device)
        store = self.stores[layer]
        store.append(k, v, self._new_positions)
        return store.read()

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

    @property
    def next_position(self) -> int:
        """The rotary position of the next token: `seen`, whatever was evicted; for a policy that re-rotates the
        keys it keeps to their places in the cache (rerotates_keys), the cache's length, as if the evicted
        tokens had never been there."""
        rerotates = self.compressor is not None and self.compressor.rerotates_keys
        return self.stores[0].length if rerotates else self.seen

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
            return
        n = self.stores[layer].length
        if self.decode_interval is not None and n > self.compressor.keep_count(layer, n) + self.decode_interval:
            self._select(layer, self._queries[layer])  # the new store is settled: it is built as a prefill's
        else:
            self.stores[layer].settle()

    def _remember_queries(self, layer: int, queries: torch.Tensor):
        """Keeps the layer's last `_query_window` queries, copied: a view would keep the forward's whole
        QKV tensor alive."""
        past = self._queries[layer]
        recent = queries if past is None else torch.cat((past, queries), dim=2)  # (B, nh, n_past + T, hs)
        self._queries[layer] = recent[:, :, max(0, recent.size(2) - self._query_window) :].clone()

    def compress(self, layer: int, queries: torch.Tensor):
        """Compresses one layer at the end of its prefill attention; `queries` (B, nh, T, hs) are the
        prefill's, after rotary. Records what the full cache held before, for the memory figures. The layer's
        store then becomes what the policy declares: its kept entries, their pruned key channels, quantized."""
        if layer == 0:  # layers are compressed in order, each right after its prefill attention
            self.nbytes_before_compression = 0
        self.nbytes_before_compression += self._layer_nbytes(layer)
        self._select(layer, queries)
        start = clock(self.device)
        compressor = self.compressor
        self.stores[layer] = compressor.holds(layer, self.stores[layer], queries)
        if compressor.kv_bits is not None:
            self.stores[layer] = self.stores[layer].wrapped(lambda store: QuantizedStore(
                store, compressor.kv_bits, compressor.kv_group_size, compressor.kv_residual))
        self.compress_seconds += clock(self.device) - start

    def _select(self, layer: int, queries: torch.Tensor):
        """The one shared selection step, at the prefill and during decoding: each policy only scores
        entries and says which to keep (select); the layer's store is replaced by one of only those.
        `queries` are those of the layer's last entries (all of them at the prefill)."""
        start = clock(self.device)
        store, compressor = self.stores[layer], self.compressor
        n = store.length
        keep = compressor.keep_count(layer, n)
        headwise = compressor.headwise_at(layer)  # (decode_queries refuses decode-time compression to those)
        if keep < n or headwise:
            keys, values = store.read()
            if keep >= n:  # a head-wise layout even when every entry stays: the cache is the same kind throughout
                chosen = torch.ones(keys.shape[:3], dtype=torch.bool, device=keys.device)
            else:
                chosen = compressor.select(layer, compressor.score(layer, keys, values, queries), keep)
            if chosen.dtype == torch.bool:
                self.stores[layer] = RaggedStore.of(store, chosen)
            else:
                kept_values = compressor.kept_values(layer, keys, values, queries, chosen)
                self._merged = self._merged or kept_values is not None
                self.stores[layer] = store.keep(chosen, kept_values)
                if compressor.rerotates_keys:  # every entry's rotary position is its index: moved to its new one
                    shift = torch.arange(chosen.size(-1), device=chosen.device) - chosen
                    self.stores[layer] = self.stores[layer].rerotated(shift, self.config)
        self.compress_seconds += clock(self.device) - start


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
