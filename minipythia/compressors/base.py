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
`kv_residual`, keyword-only settings of this base class; minipythia.quantized_cache), so that eviction,
quantization and both are configurations of the same kind.
"""


from __future__ import annotations

import dataclasses
import math
import typing
from dataclasses import asdict, dataclass, field
from typing import ClassVar, Literal

import torch

from ..bounded import shown

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
        from .registry import decoding_policies  # the registry imports this module

        raise ValueError(f"{self.name} cannot compress during decoding: {self.cannot_decode}. Use "
                         f"{', '.join(decoding_policies())}, or leave decode_interval unset")

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

    # Whether heads may keep different numbers of entries (select); the model then gives the policy a cache
    # that holds each head's entries only (minipythia.ragged_cache).
    headwise: ClassVar[bool] = False

    def select(self, layer: int, scores: torch.Tensor, keep: int) -> torch.Tensor:
        """For a head-wise policy: which entries each head keeps, BoolTensor (B, nh, L), from its scores
        (B, nh, L); keep = keep_count(layer, L), the average per head (heads may keep more or fewer)."""
        raise NotImplementedError

    # Whether a batch row's cache depends on the other rows of its batch (random draws laid out by row). Such
    # a policy, and every head-wise one (whose cache pads each head to the batch's longest, so that its
    # attention rounds otherwise), is replayed one row at a time by batched evaluation (eval.replay): a
    # prompt's figures never depend on the batch it was scored in.
    rows_interact: ClassVar[bool] = False

    @property
    def scored_by_row(self) -> bool:
        return self.rows_interact or self.headwise

    # Whether the policy also prunes key channels (key_channels); the model then gives it a cache that stores
    # only the kept channels of the prompt's keys (minipythia.pruned_keys_cache).
    prunes_key_channels: ClassVar[bool] = False

    def key_channels(self, layer: int, keys: torch.Tensor, queries: torch.Tensor) -> torch.Tensor:
        """For a policy that prunes key channels: the channels each head keeps of the prompt's kept keys,
        LongTensor (B, nh, d') in increasing order; keys (B, nh, k, hs) after eviction, queries (B, nh, L, hs)
        the prompt's. The pruned channels of those keys are dropped (q . k sums over the kept ones only)."""
        raise NotImplementedError

    @property
    def alters_entries(self) -> bool:
        """Whether its cache holds anything but copies of the prefill's kept entries (quantized, pruned or
        merged ones): caches of one prefill that kept the same positions are then not the same cache."""
        return (self.kv_bits is not None or self.prunes_key_channels or self.headwise
                or type(self).kept_values is not Compressor.kept_values)

    def prepare(self, model, input_ids: torch.Tensor):
        """Called with the model and the prompt's ids (B, L) just before a prefill into a cache with this
        compressor (and before a replay of one): for a policy that scores with a forward of its own (KVzip's
        context reconstruction). The default does nothing."""

    def missing_input(self) -> str | None:
        """What the compressor still needs before it can compress, beyond its settings (None: nothing).
        The CLIs and sweeps check it before any work (check_input)."""
        return None

    def check_input(self):
        """Raises ValueError, saying what, when missing_input() names something."""
        missing = self.missing_input()
        if missing:
            raise ValueError(missing)

    def settings(self) -> dict:
        """The policy's settings, then the storage settings when the cache is quantized."""
        values = {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}
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
            if isinstance(value, list):
                value = "-".join(map(str, value))
            parts.append(f"{names.get(key, key)}{value}")
        return "_".join(parts)


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


def attention_weights(queries: torch.Tensor, keys: torch.Tensor, causal: bool = True) -> torch.Tensor:
    """Softmax attention (float32) of queries (B, nh, Q, hs) over keys (B, nh, L, hs) -> (B, nh, Q, L),
    scaled by hs ** -0.5 as the model's. causal: the queries are those of the last Q positions of the keys
    (query i at position L - Q + i), and each sees the keys up to its own position."""
    L, hs = keys.size(2), keys.size(3)
    logits = queries.float() @ keys.float().transpose(-1, -2) / math.sqrt(hs)  # (B, nh, Q, L)
    if causal:
        Q = queries.size(2)
        visible = torch.arange(L, device=keys.device) <= torch.arange(L - Q, L, device=keys.device)[:, None]
        logits = logits.masked_fill(~visible, float("-inf"))
    return logits.softmax(dim=-1)


# --- settings: the dataclass fields, typed by their annotations ------------------------------------------

@dataclass(frozen=True)
class Setting:
    """One setting of a policy: a dataclass field, with the type its annotation gives."""
    name: str
    kind: type  # int, float, str, bool or tuple
    default: object  # dataclasses.MISSING when required
    element: type | None = None  # the type of a tuple's items
    choices: tuple | None = None  # a Literal's values
    optional: bool = False  # None is allowed

    @property
    def is_sequence(self) -> bool:
        return self.kind is tuple

    def check(self, value, policy: str):
        """The value in the setting's type (a tuple for a list, a float for an int), else TypeError; a value
        outside a Literal's choices is a ValueError (a setting the policy cannot use)."""
        if value is None and self.optional:
            return None
        if self.is_sequence and isinstance(value, (list, tuple)):
            return tuple(_typed(v, self.element, f"{policy}.{self.name}[{i}]") for i, v in enumerate(value))
        if self.is_sequence:
            raise TypeError(f"{policy}.{self.name} must be a list of {self.element.__name__}, got {shown(value)}")
        value = _typed(value, self.kind, f"{policy}.{self.name}")
        if self.choices is not None and value not in self.choices:
            raise ValueError(f"{self.name} must be one of {', '.join(map(repr, self.choices))}, got {shown(value)}")
        return value


def _typed(value, kind: type, where: str):
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if isinstance(value, kind) and not (kind is not bool and isinstance(value, bool)):
        return value
    raise TypeError(f"{where} must be {'an' if kind is int else 'a'} {kind.__name__}, got {shown(value)}")


def settings_of(cls: type) -> list[Setting]:
    """The settings of a policy class, in field order."""
    hints = typing.get_type_hints(cls)
    out = []
    for f in dataclasses.fields(cls):
        if not f.init:
            continue
        kind, optional, element, choices = hints[f.name], False, None, None
        args = typing.get_args(kind)
        if type(None) in args:  # X | None
            optional, kind = True, next(a for a in args if a is not type(None))
            args = typing.get_args(kind)
        if typing.get_origin(kind) is typing.Literal:
            choices, kind = args, type(args[0])
        elif typing.get_origin(kind) is tuple:
            kind, element = tuple, args[0]
        if kind not in (int, float, str, bool, tuple):
            raise TypeError(f"{cls.__name__}.{f.name}: a setting is an int, float, str, bool, Literal or "
                            f"tuple[X, ...] (optionally | None), got {hints[f.name]!r}")
        default = f.default if f.default is not dataclasses.MISSING else (
            f.default_factory() if f.default_factory is not dataclasses.MISSING else dataclasses.MISSING)
        out.append(Setting(f.name, kind, default, element, choices, optional))
    return out
