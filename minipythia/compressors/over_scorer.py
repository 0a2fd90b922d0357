"""The base of policies built over another one (AdaKV, ChunkKV, CriticalKV, ThinK, merging): `scorer`, another
policy (settings.Policy: a name, a mapping {compressor: NAME, setting: value, ...} or a Compressor), is built as
`inner` with the settings it gives (the others at their defaults) plus the wrapper's max_capacity_prompt when
it has that setting, which it then shares. The inner policy answers for what the wrapper does not decide
itself: the settings it takes from the model (for_model), what it still needs (missing_input), the prompt hook
(prepare). Put it first among the bases: `class ChunkKV(OverScorer, CapacityBudget, Compressor)`.

One compatibility rule for every wrapper: a scorer may do more than score (choose per-head budgets, prune key
channels, set its kept entries' values); a wrapper names in `carries` what of that it carries out for its scorer
(by delegating select, holds or kept_values), and any other of it would be dropped silently, so such a scorer is
refused. A wrapper that needs scores (`needs_scores`) refuses `none`, which scores nothing.
"""

from __future__ import annotations

from typing import ClassVar

from .base import Compressor
from .none import NoCompression
from .registry import COMPRESSORS, build_policy, policy_name
from .settings import Policy

# What a policy may do besides scoring entries, and how a refusal says it.
DOES = {"headwise": "it gives heads budgets of their own",
        "prunes_keys": "it prunes key channels",
        "sets_values": "it sets its kept entries' values itself"}


def what_it_does(cls: type[Compressor]) -> list[str]:
    """Which of DOES a policy class does."""
    done = {"headwise": cls.headwise, "prunes_keys": cls.prunes_key_channels,
            "sets_values": cls.kept_values is not Compressor.kept_values}
    return [key for key, does in done.items() if does]


class OverScorer:
    scorer: Policy
    max_capacity_prompt: int
    carries: ClassVar[frozenset[str]] = frozenset()  # of DOES: what the wrapper carries out for its scorer
    needs_scores: ClassVar[bool] = True

    def refused_scorer(self, cls: type[Compressor]) -> str | None:
        """Why a policy cannot be this wrapper's scorer (None: it can); the wrapper itself never can."""
        if self.needs_scores and issubclass(cls, NoCompression):
            return "it keeps every entry and scores none"
        dropped = [DOES[key] for key in what_it_does(cls) if key not in self.carries]
        return f"{dropped[0]}, which {self.name} does not carry out" if dropped else None

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

    @property
    def sees_future(self) -> bool:
        return self.inner.sees_future

    def see_future(self, queries):
        self.inner.see_future(queries)

    def prepare(self, model, prompt):
        self.inner.prepare(model, prompt)

    def scorer_decode_queries(self) -> int:
        """The scorer's decode_queries(), its refusal naming the wrapper."""
        try:
            return self.inner.decode_queries()
        except ValueError as e:
            raise ValueError(f"{self.name} with scorer {self.scorer}: {e}") from None
