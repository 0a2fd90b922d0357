"""The registry of compression policies, and the one builder that turns settings into a compressor.

`@register` on a Compressor dataclass makes it known by its `name` to everything that takes a policy by
name: `build_compressor`, the CLIs' `--compressor` and their per-setting flags, and sweep YAML. A policy
written outside the package registers itself the same way; `import_policies` loads such a module from a
file or module name (the CLIs' `--policy-module`, a sweep's `policy_modules:`).
"""

from __future__ import annotations

import dataclasses
import importlib
import importlib.util
import sys
from pathlib import Path

from .base import STORAGE_SETTINGS, Compressor
from .settings import settings_of

COMPRESSORS: dict[str, type[Compressor]] = {}


def register(cls: type[Compressor]) -> type[Compressor]:
    """Class decorator (or plain call): registers a policy under its `name`."""
    if not (isinstance(cls, type) and issubclass(cls, Compressor) and dataclasses.is_dataclass(cls)):
        raise TypeError(f"register() takes a @dataclass subclass of minipythia.Compressor, got {cls!r}")
    name = cls.__dict__.get("name")
    if not isinstance(name, str) or not name.isidentifier():
        raise TypeError(f"{cls.__name__} needs its own `name`, a lowercase identifier such as 'snapkv', got {name!r}")
    if cls.keep_count is Compressor.keep_count or cls.score is Compressor.score:
        raise TypeError(f"{cls.__name__} must define keep_count() and score()")
    known = COMPRESSORS.get(name)
    # The same class loaded again (a module imported twice by path) replaces itself; another class may not.
    if known is not None and (known.__module__, known.__qualname__) != (cls.__module__, cls.__qualname__):
        raise ValueError(f"a compressor named {name!r} is already registered ({known.__module__}.{known.__qualname__}); "
                         f"give {cls.__name__} another name")
    settings_of(cls)  # annotations the CLI and YAML cannot read fail here, not when a user runs it
    COMPRESSORS[name] = cls
    return cls


def decoding_policies() -> list[str]:
    """The registered policies that can compress during decoding (they define decode_queries())."""
    return [name for name, cls in COMPRESSORS.items() if cls.decode_queries is not Compressor.decode_queries]


def policy_class(name: str) -> type[Compressor]:
    cls = COMPRESSORS.get(name)
    if cls is None:
        raise ValueError(f"unknown compressor {name!r}; registered: {', '.join(COMPRESSORS)} (a policy of your own: "
                         f"register it and load its module with --policy-module / policy_modules)")
    return cls


def build_compressor(name: str, settings: dict | None = None) -> Compressor:
    """The compressor `name` with `settings` (a mapping of its dataclass fields; the others keep their
    defaults). Unknown settings and wrong types are TypeErrors; values the policy rejects, ValueErrors."""
    cls = policy_class(name)
    settings = dict(settings or {})
    known = [s.name for s in settings_of(cls)]
    unknown = [k for k in settings if k not in known]
    if unknown:
        raise TypeError(f"{name} has no setting {unknown[0]!r}; its settings: {', '.join(known) or 'none'}")
    return cls(**settings)


def policy_name(spec) -> str:
    """The name of a policy-valued setting (settings.Policy, already type-checked): a name or a mapping's."""
    return spec if isinstance(spec, str) else spec["compressor"]


def build_policy(spec, shared: dict, owner: str) -> tuple[str | dict, Compressor]:
    """A policy-valued setting (settings.Policy) built for the policy `owner` that holds it: returns its short
    form (the name alone when every setting it gives is at its default, else {compressor: NAME, ...the others})
    and the compressor. `shared` holds settings the owner passes down (its max_capacity_prompt), given to the
    inner policy when it has them: the spec may repeat them, or leave them at their defaults, but not contradict
    them. Storage settings (kv_bits)
    are the owner's, never an inner policy's."""
    name = policy_name(spec)
    given = {} if isinstance(spec, str) else {k: v for k, v in spec.items() if k != "compressor"}
    fields = {s.name: s for s in settings_of(policy_class(name))}
    for key, value in given.items():
        if key in STORAGE_SETTINGS and value != fields[key].default:
            raise ValueError(f"{owner}'s {name} cannot set {key}: storage is {owner}'s own setting")
        value = fields[key].check(value, name) if key in fields else value
        if key in shared and key in fields and value not in (shared[key], fields[key].default):  # (a Compressor carries its default)
            raise ValueError(f"{owner}'s {name} takes {key} from {owner} ({shared[key]}); leave it out")
    # The short form keeps what differs from the defaults, as the settings record them (lists, not tuples).
    own = {k: v for k, v in given.items() if k not in shared and k in fields and fields[k].check(v, name) != fields[k].default}
    own = {k: list(v) if isinstance(v, tuple) else v for k, v in own.items()}
    compressor = build_compressor(name, {**given, **{k: v for k, v in shared.items() if k in fields}})
    if compressor.rerotates_keys:
        raise ValueError(f"{owner}'s {name} cannot re-rotate keys: positions are the whole cache's; use {name} alone")
    return (name if not own else {"compressor": name, **own}), compressor


# The package a policy file's module is put in (it is not importable by that name anywhere else).
FILE_POLICY_PACKAGE = "minipythia_policies"


def import_policies(sources) -> None:
    """Imports each source, a .py file or an importable module name, so that its @register calls run."""
    for source in sources:
        path = Path(source)
        if path.suffix == ".py":
            if not path.is_file():
                raise ValueError(f"policy module {source!r} does not exist; give a .py file or a module name")
            module_name = f"{FILE_POLICY_PACKAGE}.{path.stem}"
            spec = importlib.util.spec_from_file_location(module_name, path.resolve())
            module = importlib.util.module_from_spec(spec)
            sys.modules[module_name] = module  # so that dataclasses and type hints can find the module
            spec.loader.exec_module(module)
        else:
            try:
                importlib.import_module(source)
            except ModuleNotFoundError as e:
                raise ValueError(f"cannot import policy module {source!r} ({e}); give a .py file or an importable "
                                 f"module name") from None
