"""The interface every KV-cache compression policy implements, and the pieces policies share.

A policy is a dataclass whose fields are its settings. It says how many entries a layer keeps per head
(`keep_count`) and scores each cached entry (`score`, higher = keep). The cache does the rest in one
shared step: top-k per (batch, head), kept in position order, gathered into new tensors
(`KVCache.compress`). Everything else the system needs to know about a policy is declared here, on its
class: which recent queries it reads when it compresses during decoding (`decode_queries`), settings
derived from the model (`for_model`), data it still needs before it can run (`missing_input`), the
values its kept entries hold when it merges the evicted ones into them (`kept_values`), the short names of its
settings in labels (`label_names`). The settings' types are the fields' annotations:
they are checked on construction, and the CLI flags and sweep YAML keys come from them
(`minipythia.compressors.registry`).

Every policy also composes with quantized storage of what it keeps (KIVI: `kv_bits`, `kv_group_size`,
`kv_residual`, keyword-only settings of this base class; minipythia.kv.quantized), so that eviction,
quantization and both are configurations of the same kind, whatever else the policy's layers store.
"""


from __future__ import annotations

import dataclasses
import math
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, ClassVar, Literal

import torch

from ..kv import PrunedKeysStore, Store
from .settings import settings_of

if TYPE_CHECKING:
    from ..prefill import Prompt  # the prefill imports the cache, which imports the policies

# The storage settings every policy has; they appear in settings() and labels only when kv_bits is set.
STORAGE_SETTINGS = ("kv_bits", "kv_group_size", "kv_residual")


@dataclass
class Compressor:
    name: ClassVar[str]
    # Short names of settings in labels ("" shows the value alone); merged with those of the parent classes.
    label_names: ClassVar[dict[str, str]] = {"kv_bits": "kv", "kv_group_size": "g", "kv_residual": "res"}
    # Why the policy cannot compress during decoding; a policy that can overrides decode_queries() instead.
    cannot_decode: ClassVar[str] = ("it does not say which of the newest queries its score() reads (a policy that "
                                    "can compress during decoding overrides Compressor.decode_queries)")

    # Settings added after the policy's first release, left out of settings() and labels at their default, so
    # that results and folders made before them keep their names.
    omitted_at_default: ClassVar[tuple[str, ...]] = ()

    # Quantized storage of the kept entries (KIVI): bits per code, None = the model's dtype; tokens per key
    # group, channels per value group; the newest entries kept in full precision (a multiple of the group).
    kv_bits: Literal[2, 4, 8] | None = field(default=None, kw_only=True)
    kv_group_size: int = field(default=32, kw_only=True)
    kv_residual: int = field(default=128, kw_only=True)

    def __post_init__(self):
        for setting in settings_of(type(self)):
            setattr(self, setting.name, setting.check(getattr(self, setting.name), self.name))
        self.check_storage()
        self.validate()

    def check_storage(self):
        """ValueError on storage settings that cannot be used, or that would do nothing without kv_bits."""
        if self.kv_bits is None:
            defaults = {f.name: f.default for f in dataclasses.fields(Compressor)}
            if (self.kv_group_size, self.kv_residual) != (defaults["kv_group_size"], defaults["kv_residual"]):
                raise ValueError("kv_group_size and kv_residual apply to a quantized cache: give kv_bits (2, 4 or 8)")
            return
        if self.kv_group_size < 1:
            raise ValueError(f"kv_group_size must be >= 1, got {self.kv_group_size}")
        if self.kv_residual < self.kv_group_size or self.kv_residual % self.kv_group_size:
            raise ValueError(f"kv_residual must be a positive multiple of kv_group_size ({self.kv_group_size}): keys "
                             f"are quantized a group of tokens at a time, got {self.kv_residual}")

    def validate(self):
        """Raises ValueError on settings of the right type that the policy cannot use (an even kernel, ...)."""

    def keep_count(self, layer: int, seq_len: int) -> int:
        """Entries to keep per head in `layer` when the prefill left `seq_len`; >= seq_len keeps all."""
        raise NotImplementedError

    def score(self, layer: int, keys: torch.Tensor, values: torch.Tensor, queries: torch.Tensor) -> torch.Tensor:
        """keys, values (B, nh, L, hs), after rotary, and queries (B, nh, Q, hs) -> scores (B, nh, L).

        At the prefill the queries are the prompt's (Q = L); when the cache compresses during decoding they
        are the layer's Q = decode_queries() newest ones, those of its last Q entries."""
        raise NotImplementedError

    def decode_queries(self) -> int:
        """How many of a layer's newest queries score() reads when the cache compresses during decoding
        (KVCache decode_interval); the cache keeps that many. Raises ValueError, saying why, for a policy
        whose budget or scores only mean something for a whole prompt."""
        raise ValueError(f"{self.name} cannot compress during decoding: {self.cannot_decode}. Use a policy that "
                         f"can (minipythia.compressors.decoding_policies()), or leave decode_interval unset")

    def for_model(self, config) -> None:
        """Called with the model's PythiaConfig before the compressor is used (by the cache, and by sweeps
        before they name their folders): fills settings derived from the model, rejects those that do not
        fit it (ValueError)."""

    def kept_values(self, layer: int, keys: torch.Tensor, values: torch.Tensor, queries: torch.Tensor,
                    idx: torch.Tensor) -> torch.Tensor | None:
        """The values the kept entries hold once the others are evicted: None keeps them as they were (every
        policy but those that merge evicted entries into kept ones). keys, values (B, nh, L, hs) and queries
        as score() gets them; idx (B, nh, k) the kept entries, in position order. Returns (B, nh, k, hs)."""
        return None

    def select(self, layer: int, scores: torch.Tensor, keep: int) -> torch.Tensor:
        """Which entries to keep, from their scores (B, nh, L); keep = keep_count(layer, L). Every head the same
        count: LongTensor (B, nh, keep) of the kept slots, in position order (the default: each head's top
        `keep`). Heads with budgets of their own (headwise): BoolTensor (B, nh, L), `keep` then the average per
        head. The cache stores what it gets accordingly (minipythia.kv)."""
        return scores.topk(keep, dim=-1).indices.sort(dim=-1).values

    # Whether heads may keep different numbers of entries (select returns a mask); the cache then holds each
    # head's entries only (minipythia.kv.ragged).
    headwise: ClassVar[bool] = False

    def headwise_at(self, layer: int) -> bool:
        """Whether `layer`'s heads get budgets of their own (a policy per layer answers per layer)."""
        return self.headwise

    # Whether a batch row's cache depends on the other rows of its batch (random draws laid out by row): batched
    # evaluation then replays the policy one row at a time (eval.replay).
    rows_interact: ClassVar[bool] = False

    # Whether the policy also prunes key channels (key_channels); the cache then stores only the kept channels
    # of the prompt's keys (minipythia.kv.pruned_keys).
    prunes_key_channels: ClassVar[bool] = False

    def prunes_keys_at(self, layer: int) -> bool:
        """Whether `layer`'s prompt keys keep only some channels (key_channels)."""
        return self.prunes_key_channels

    def key_channels(self, layer: int, keys: torch.Tensor, queries: torch.Tensor) -> torch.Tensor:
        """For a policy that prunes key channels: the channels each head keeps of the prompt's kept keys,
        LongTensor (B, nh, d') in increasing order; keys (B, nh, k, hs) after eviction, queries (B, nh, L, hs)
        the prompt's. The pruned channels of those keys are dropped (q . k sums over the kept ones only)."""
        raise NotImplementedError

    def holds(self, layer: int, store: Store, queries: torch.Tensor) -> Store:
        """What `layer` holds once the prefill's entries are kept (`store`, queries (B, nh, L, hs) the prompt's):
        those entries as they are, or only the key channels key_channels() names for a policy that prunes them.
        A policy with a storage kind of its own (a Store subclass, minipythia/kv/) returns it here; quantized
        storage (kv_bits) then wraps whatever this returns."""
        if not self.prunes_keys_at(layer):
            return store
        return PrunedKeysStore(store, self.key_channels(layer, store.read()[0], queries))

    @property
    def rerotates_keys(self) -> bool:
        """Whether the keys it keeps move to their places in the cache (rotary position = index), the next token
        then taking the cache's length as its position (KVCache.next_position): StreamingLLM's official cache."""
        return False

    def prepare(self, model, prompt: "Prompt"):
        """Called with the model and the prompt (minipythia.prefill.Prompt: its ids (B, L) as `input_ids`)
        just before a prefill into a cache with this compressor, and before a replay of one: for a policy that
        scores with the whole model. `prompt.prefill` is the prompt's uncompressed prefill, every layer's keys,
        values and queries, recorded once when first asked for (the forward then fills the cache from it rather
        than running the prompt again). The default does nothing."""

    def missing_input(self) -> str | None:
        """What the compressor still needs before it can compress, beyond its settings (None: nothing).
        The CLIs and sweeps check it before any work (check_input)."""
        return None

    @property
    def sees_future(self) -> bool:
        """Whether it scores with the queries of the tokens that come after the prompt (the oracle, an upper
        bound). Where those tokens are known, the eval gives their queries (see_future) before each replay:
        the targets of a PPL window or a task (eval.replay); a sweep runs it there, and not in its speed part."""
        return False

    def see_future(self, queries: dict[int, torch.Tensor]):
        """The queries after rotary, per layer (B, nh, F, hs), of the F tokens that follow the prompt about to be
        compressed ({} forgets them). Only a compressor that sees_future reads them."""

    def check_input(self):
        """Raises ValueError, saying what, when missing_input() names something."""
        missing = self.missing_input()
        if missing:
            raise ValueError(missing)

    def settings(self) -> dict:
        """The policy's settings, then the storage settings when the cache is quantized."""
        values = {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}
        defaults = {f.name: f.default for f in dataclasses.fields(self)}
        for key in self.omitted_at_default:
            if values[key] == defaults[key]:
                del values[key]
        storage = {k: values.pop(k) for k in STORAGE_SETTINGS}
        return {**values, **storage} if self.kv_bits is not None else values

    @property
    def label(self) -> str:
        """A short name for tables and folder names, e.g. 'snapkv_w32_c512_k5_avgpool'."""
        names = {}
        for cls in reversed(type(self).__mro__):
            names.update(cls.__dict__.get("label_names", {}))
        parts = [self.name]
        for key, value in self.settings().items():
            if value in ((), [], None):
                continue
            parts.append(f"{names.get(key, key)}{_label_value(value)}")
        return "_".join(parts)


def _label_value(value) -> str:
    """A setting's value in a label: a list joined by '-', a policy given with settings (a mapping) as its name
    and settings, '-'-joined ('snapkv-window_size16')."""
    if isinstance(value, list):
        return "-".join(map(_label_value, value))
    if isinstance(value, dict):
        return "-".join([value["compressor"], *(f"{k}{_label_value(v)}" for k, v in value.items() if k != "compressor")])
    return str(value)


class CapacityBudget:
    """For policies with a fixed budget, the field `max_capacity_prompt` = C: every layer keeps at most C
    entries per head, and a prompt of at most C tokens stays whole. Put it first among the bases:
    `class MyPolicy(CapacityBudget, Compressor)`."""

    max_capacity_prompt: int
    label_names: ClassVar[dict[str, str]] = {"max_capacity_prompt": "c"}

    def validate(self):
        if self.max_capacity_prompt < 1:
            raise ValueError(f"max_capacity_prompt must be >= 1, got {self.max_capacity_prompt}")
        super().validate()

    def keep_count(self, layer, seq_len):
        return min(seq_len, self.max_capacity_prompt)


# Queries whose attention is materialised at once (H2O, Merging, KVzip): a (B, nh, QUERY_CHUNK, L) float32 block
# instead of the whole (B, nh, Q, L) matrix.
QUERY_CHUNK = 256


def attention_weights(queries: torch.Tensor, keys: torch.Tensor, causal: bool = True) -> torch.Tensor:
    """Softmax attention (float32) of queries (B, nh, Q, hs) over keys (B, nh, L, hs) -> (B, nh, Q, L),
    scaled by hs ** -0.5 as the model's. causal: the queries are those of the last Q positions of the keys
    (query i at position L - Q + i), and each sees the keys up to its own position."""
    L, hs = keys.size(2), keys.size(3)
    # In place on the product (the same operations, so the same bits): a (B, nh, Q, L) float32 block is large,
    # and a fresh one per step costs the allocator its pages again (page faults), more than the step itself.
    logits = (queries.float() @ keys.float().transpose(-1, -2)).div_(math.sqrt(hs))  # (B, nh, Q, L)
    if causal:
        # Query i sees keys up to L - Q + i: only the last Q columns can be hidden, above their diagonal, so the
        # mask covers those (Q x Q) instead of the whole (Q, L) block; the same entries become -inf.
        Q = queries.size(2)
        hidden = torch.ones(Q, Q, dtype=torch.bool, device=keys.device).triu(diagonal=1)
        logits[..., L - Q :].masked_fill_(hidden, float("-inf"))
    return logits.softmax(dim=-1)
