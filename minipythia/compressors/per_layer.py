from __future__ import annotations

from dataclasses import dataclass

import json

from .base import CapacityBudget, Compressor
from .none import NoCompression
from .registry import COMPRESSORS, build_policy, policy_name, register
from .settings import Policy


@register
@dataclass
class PerLayer(CapacityBudget, Compressor):
    """A different registered policy in each layer, e.g. the full KV cache in the first layers and SnapKV after.

    `layers` names one policy per layer, from the bottom one up; when it names fewer than the model has, its
    LAST name applies to every deeper layer: ("none", "snapkv") keeps layer 0 whole and compresses every other
    layer with SnapKV (more names than layers is a ValueError from for_model). A layer's policy is a name or, with
    settings of its own, a mapping ({compressor: snapkv, window_size: 16}; settings.Policy). Each is built once,
    with what it gives plus `max_capacity_prompt` when it has that setting (the budget is shared), and a layer
    is compressed exactly as its policy compresses it on a cache of its own: keep_count and score delegate to
    it, with the real layer index (so that PyramidKV, say, keeps its per-layer budget). `inner[layer]` is the
    layer's policy, filled by for_model once the depth is known; a name used by several layers is one policy.

    Each layer's store is what its policy declares (minipythia.kv): head-wise budgets (a ragged store), pruned
    key channels, merged values, or plain kept entries, so any policies mix; only per_layer cannot nest
    itself. Quantized storage (kv_bits) is per_layer's own and applies to every layer, whatever it stores.

    Decoding (decode_interval): allowed only when every layer's policy can compress during decoding. The cache
    keeps one window of newest queries for all layers, so decode_queries() is the largest any layer reads;
    during decoding, score() hands each layer's policy only the newest decode_queries() of them that the policy
    itself reads, which are exactly those a cache of its own would have kept. (A decode-time call is told from
    the prefill's by its query count: the prefill gives one query per cached entry.)
    """

    name = "per_layer"
    label_names = {"layers": ""}
    max_capacity_prompt: int = 512
    layers: tuple[Policy, ...] = ("none", "snapkv")

    def validate(self):
        super().validate()
        if not self.layers:
            raise ValueError("layers must name at least one policy (one per layer; the last applies to the deeper "
                             "layers), e.g. none,snapkv")
        for i, policy in enumerate(map(policy_name, self.layers)):
            cls = COMPRESSORS.get(policy)
            if cls is None:
                raise ValueError(f"layers[{i}] must be a registered policy, got {policy!r}; registered: "
                                 f"{', '.join(n for n in COMPRESSORS if n != self.name)}")
            why = self.refused(cls)
            if why:
                raise ValueError(f"layers[{i}] cannot be {policy!r}: {why}")

    @staticmethod
    def refused(cls: type[Compressor]) -> str | None:
        """Why a policy cannot be one layer's (None: it can)."""
        if issubclass(cls, PerLayer):
            return "per_layer cannot nest itself"
        return None

    def __post_init__(self):
        super().__post_init__()  # the settings are checked first, so every name is a usable one
        self.policies: dict[str, Compressor] = {}  # each distinct policy, built once, by its key()
        layers = []
        for spec in self.layers:
            try:
                spec, policy = build_policy(spec, {"max_capacity_prompt": self.max_capacity_prompt}, self.name)
            except ValueError as e:
                raise ValueError(f"per_layer's policy {policy_name(spec)} (max_capacity_prompt "
                                 f"{self.max_capacity_prompt}) cannot be built: {e}") from None
            layers.append(spec)
            self.policies.setdefault(key(spec), policy)
        self.layers = tuple(layers)
        self.inner: list[Compressor] = []  # one per layer, filled by for_model

    def policy(self, layer: int) -> Compressor:
        """The policy of `layer`: its name in `layers`, or the last name for a deeper layer."""
        if layer < len(self.inner):
            return self.inner[layer]
        return self.policies[key(self.layers[min(layer, len(self.layers) - 1)])]

    def for_model(self, config):
        n = config.num_hidden_layers
        if len(self.layers) > n:
            raise ValueError(f"per_layer names {len(self.layers)} policies ({','.join(map(policy_name, self.layers))}) for a model of "
                             f"{n} layers: give at most one per layer (the last applies to the deeper layers)")
        self.inner = []  # policy() then reads `layers` afresh (for_model may be called again)
        self.inner = [self.policy(layer) for layer in range(n)]
        for policy in self.policies.values():
            policy.for_model(config)

    def keep_count(self, layer, seq_len):
        return self.policy(layer).keep_count(layer, seq_len)

    def score(self, layer, keys, values, queries):
        policy = self.policy(layer)
        # The cache never scores a layer that keeps all (keep_count); a wrapper with per_layer as its scorer would.
        if isinstance(policy, NoCompression):
            raise ValueError(f"per_layer's layer {layer} is {policy.name!r}, which keeps every entry and scores none: "
                             f"per_layer with a 'none' layer cannot be another policy's scorer")
        Q = queries.size(2)
        if Q != keys.size(2):  # during decoding: the newest queries the layer's own policy reads (0: none)
            reads = policy.decode_queries()
            if 0 < reads < Q:
                queries = queries[:, :, Q - reads :]
        return policy.score(layer, keys, values, queries)

    def select(self, layer, scores, keep):
        return self.policy(layer).select(layer, scores, keep)

    def headwise_at(self, layer):
        return self.policy(layer).headwise_at(layer)

    def kept_values(self, layer, keys, values, queries, idx):
        return self.policy(layer).kept_values(layer, keys, values, queries, idx)

    def prunes_keys_at(self, layer):
        return self.policy(layer).prunes_keys_at(layer)

    def holds(self, layer, store, queries):
        return self.policy(layer).holds(layer, store, queries)

    def decode_queries(self):
        reads = []
        for policy in self.policies.values():
            try:
                reads.append(policy.decode_queries())
            except ValueError as e:
                raise ValueError(f"per_layer with {policy.name} in layers: {e}") from None
        return max(reads)

    def prepare(self, model, prompt):
        for policy in self.policies.values():
            policy.prepare(model, prompt)

    def missing_input(self):
        return next((m for m in (p.missing_input() for p in self.policies.values()) if m is not None), None)

    @property
    def sees_future(self) -> bool:
        return any(p.sees_future for p in self.policies.values())

    def see_future(self, queries):
        for policy in self.policies.values():
            policy.see_future(queries)


def key(spec) -> str:
    """One policy-valued setting's identity (a name, or its mapping in a canonical text)."""
    return spec if isinstance(spec, str) else json.dumps(spec, sort_keys=True)
