"""The base of policies built over another one (AdaKV, ChunkKV, CriticalKV, ThinK, merging): `scorer`, another
policy (settings.Policy: a name, a mapping {compressor: NAME, setting: value, ...} or a Compressor), is built as
`inner` with the settings it gives (the others at their defaults) plus the wrapper's max_capacity_prompt when
it has that setting, which it then shares. The inner policy answers for what the wrapper does not decide
itself: the settings it takes from the model (for_model), what it still needs (missing_input), the prompt hook
(prepare). Put it first among the bases: `class ChunkKV(OverScorer, CapacityBudget, Compressor)`.
"""

from __future__ import annotations

from .base import Compressor
from .registry import COMPRESSORS, build_policy, policy_name
from .settings import Policy


class OverScorer:
    scorer: Policy
    max_capacity_prompt: int

    def refused_scorer(self, cls: type[Compressor]) -> str | None:
        """Why a policy cannot be this wrapper's scorer (None: it can); the wrapper itself never can."""
        return None

    def __post_init__(self):
        super().__post_init__()  # the settings are checked first, so the scorer's name is a usable one
        try:
            self.scorer, self.inner = build_policy(self.scorer, {"max_capacity_prompt": self.max_capacity_prompt},
                                                   self.name)
        except ValueError as e:
            raise ValueError(f"{self.name}'s scorer {policy_name(self.scorer)} (max_capacity_prompt "
                             f"{self.max_capacity_prompt}) cannot be built: {e}") from None

    def validate(self):
        super().validate()
        name = policy_name(self.scorer)
        cls = COMPRESSORS.get(name)
        if cls is None:
            raise ValueError(f"scorer must be a registered policy, got {name!r}; registered: "
                             f"{', '.join(n for n in COMPRESSORS if n != self.name)}")
        why = f"{self.name} cannot be its own scorer" if issubclass(cls, type(self)) else self.refused_scorer(cls)
        if why:
            raise ValueError(f"scorer cannot be {name!r}: {why}")

    def for_model(self, config):
        self.inner.for_model(config)

    def missing_input(self):
        return self.inner.missing_input()

    def prepare(self, model, input_ids):
        self.inner.prepare(model, input_ids)

    def scorer_decode_queries(self) -> int:
        """The scorer's decode_queries(), its refusal naming the wrapper."""
        try:
            return self.inner.decode_queries()
        except ValueError as e:
            raise ValueError(f"{self.name} with scorer {self.scorer}: {e}") from None
