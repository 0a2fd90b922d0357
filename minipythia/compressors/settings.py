"""A policy's settings are its dataclass fields, typed by their annotations: int, float, str, bool, a Literal, a
tuple of one of those, or `Policy` (another policy: a wrapper's scorer), each optionally `| None`. They are
checked on construction, and the CLI flags and sweep YAML keys come from them (minipythia.compressors.registry).
"""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass

from ..bounded import shown


class Policy:
    """The annotation of a setting whose value is another policy (a wrapper's scorer, per_layer's layers): a
    registered name ("snapkv"), a mapping of a name and settings ({"compressor": "snapkv", "window_size": 16}),
    or a Compressor instance (taken as the mapping of its settings). The wrapper builds it
    (registry.build_policy), which also writes the value back in its short form: the name alone when every
    setting is at its default."""


@dataclass(frozen=True)
class Setting:
    """One setting of a policy: a dataclass field, with the type its annotation gives."""
    name: str
    kind: type  # int, float, str, bool, tuple or Policy
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
            raise TypeError(f"{policy}.{self.name} must be a list of {_kind_name(self.element)}, got {shown(value)}")
        value = _typed(value, self.kind, f"{policy}.{self.name}")
        if self.choices is not None and value not in self.choices:
            raise ValueError(f"{self.name} must be one of {', '.join(map(repr, self.choices))}, got {shown(value)}")
        return value


def _kind_name(kind: type) -> str:
    return "policy (a name or {compressor: NAME, setting: value})" if kind is Policy else kind.__name__


def _typed(value, kind: type, where: str):
    if kind is Policy:
        return _policy_value(value, where)
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if isinstance(value, kind) and not (kind is not bool and isinstance(value, bool)):
        return value
    raise TypeError(f"{where} must be {'an' if kind is int else 'a'} {kind.__name__}, got {shown(value)}")


def _policy_value(value, where: str):
    """A name, or a mapping {compressor: NAME, ...settings} (a Compressor gives the mapping of its settings)."""
    if isinstance(value, str):
        return value
    if hasattr(value, "settings") and isinstance(getattr(value, "name", None), str):  # a Compressor
        value = {"compressor": value.name, **value.settings()}
    if isinstance(value, dict) and isinstance(value.get("compressor"), str):
        return dict(value)
    raise TypeError(f"{where} must be a policy: a registered name, a mapping {{compressor: NAME, setting: value}} "
                    f"or a Compressor, got {type(value).__name__}")


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
        if kind not in (int, float, str, bool, tuple, Policy) or element not in (None, int, float, str, bool, Policy):
            raise TypeError(f"{cls.__name__}.{f.name}: a setting is an int, float, str, bool, Literal, Policy or "
                            f"tuple[X, ...] (optionally | None), got {hints[f.name]!r}")
        default = f.default if f.default is not dataclasses.MISSING else (
            f.default_factory() if f.default_factory is not dataclasses.MISSING else dataclasses.MISSING)
        out.append(Setting(f.name, kind, default, element, choices, optional))
    return out
