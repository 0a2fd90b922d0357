"""Sweep configuration: a YAML file that names the model, the data, the windows, an optional speed part and
a grid of policies, and its expansion into compressors.

    model: weights/tiny-pg19        # optional; --model overrides (default: as for every CLI); a list is an axis
    revision: [step1000, step143000]  # optional: hub revisions (training checkpoints); a list is an axis
    data: pg19                      # pg19, wikitext-2, wikitext-103, hf:NAME[:CONFIG][#COLUMN], a directory of .txt
                                    # books or a list of .txt files (eval/data.py); --data overrides
    books: 4                        # optional: only the first N books (default all); --books overrides
    ctx_len: 1024                   # optional; default: the model's trained length, at most 2048
    stride: 256                     # optional; default: ctx_len / 4
    max_tokens: 8192                # each book's first N tokens (default 8192); null scores whole books
    mode: window                    # window (default) | stream: token by token, compressing during decoding
    decode_interval: 64             # stream mode: entries a layer may hold above its budget before compressing
    tasks: [ppl, recall, needle, continuation]   # optional (default [ppl]); settings: {recall: {trials: 4}}
    batch_windows: 8                # optional: PPL windows, and task examples of one shape, 8 at a time (same NLLs)
    speed: {prompt_lengths: [512, 1024, 2048], new_tokens: 32, repeats: 3, hf: false}   # optional
    policy_modules: [my_policy.py]  # optional: files (relative to this YAML) or modules that register policies
    policies:
      - {compressor: none}
      - {compressor: snapkv, window_size: [16, 32], max_capacity_prompt: [256, 512], pooling: avgpool}
      - {compressor: knorm, compression_ratio: [0.5, 0.75]}

A policy entry names a registered compressor (minipythia.compressors.COMPRESSORS) and any of its settings
(dataclass fields); they are built by minipythia's one builder, so a new policy needs no change here.
A list value is a grid axis: the entry expands to the cartesian product of its axes. A setting whose own
value is a sequence (KnormPress's skip_layers) takes a flat list as one value and a list of lists as an axis.
A setting whose value is another policy (a wrapper's scorer, per_layer's layers) takes a name or a mapping with
settings of its own, `scorer: {compressor: snapkv, window_size: 16}`; lists inside that mapping are not axes.
Settings derived from the model (PyramidKV's num_layers) are filled by the policy's for_model().
`tasks` lists what each configuration is scored on (eval.tasks; ppl is eval.ppl's sliding windows, whose
one setting is short_context, the control of its `retained`); a task's settings are single values, not axes.
`model` and `revision` may be lists: every (model, revision) pair is a sweep of its own in OUT/<model>/<revision>/
(eval.scale), each model loaded once; a local model directory's revision REV is its subfolder REV.
Combinations the policy rejects (its ValueError, e.g. window >= capacity, or data it lacks, as the oracle's
future queries) are skipped with the reason; anything else wrong (YAML syntax, unknown keys or policies,
wrong types) is a ConfigError: the CLI prints it on one line and exits with code 2.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from minipythia.bounded import shown
from minipythia.compressors import COMPRESSORS, Compressor, build_compressor, import_policies
from minipythia.compressors.base import STORAGE_SETTINGS
from minipythia.compressors.settings import Policy as PolicyValued, settings_of
from minipythia.generate import WARMUP_STEPS
from minipythia.weights import DTYPES

from .tasks import TASKS, Task, build_task

DEFAULT_MAX_TOKENS = 8192
# A sweep file's values counted as its aliases expand, and the configurations its axes multiply to: far above
# any real grid (eval/configs/full.yaml: a few hundred values, 99 configurations), far below what hurts.
MAX_EXPANDED_VALUES = 100_000
MAX_SPEC_BYTES = 1 << 20
MAX_COMBINATIONS = 10_000
DEFAULT_BATCH_SIZE = 16
PPL = "ppl"  # the task eval.ppl runs: sliding windows over the books
DEFAULT_SHORT_CONTEXT = 128  # PPL's short-context control: the tokens before the targets it sees
TOP_KEYS = ("model", "revision", "dtype", "data", "books", "tokenizer", "ctx_len", "stride", "max_tokens",
            "mode", "decode_interval", "ppl", "tasks", "batch_size", "batch_windows", "speed", "policy_modules",
            "policies")
SPEED_KEYS = ("prompt_lengths", "new_tokens", "repeats", "hf")


class ConfigError(ValueError):
    """A sweep configuration that cannot be run as written (a ValueError: the CLI exits with code 2)."""


@dataclass
class SpeedSpec:
    prompt_lengths: list[int]
    new_tokens: int = 32
    repeats: int = 3
    hf: bool = False  # also time transformers' generate on the same checkpoint (no compression)


@dataclass
class Policy:
    """One entry of `policies`: a compressor and its settings, each a list of the values to sweep."""
    compressor: str
    axes: dict[str, list]
    index: int  # position in the YAML list, for messages


@dataclass
class SweepSpec:
    path: Path
    text: str  # the YAML as written, kept with the results
    policies: list[Policy]
    model: str | None = None
    revision: str | None = None
    dtype: str = "float32"
    data: list[str] = field(default_factory=lambda: ["pg19"])
    books: int | None = None
    tokenizer: str | None = None
    ctx_len: int | None = None
    stride: int | None = None
    max_tokens: int | None = DEFAULT_MAX_TOKENS
    mode: str = "window"  # or "stream" (eval.stream)
    decode_interval: int | None = None  # stream mode only
    ppl: bool = True
    short_context: int | None = DEFAULT_SHORT_CONTEXT  # PPL's control (eval.ppl.reference_fields); None: none
    tasks: list[Task] = field(default_factory=list)  # the tasks beyond PPL, in the YAML's order
    batch_size: int = DEFAULT_BATCH_SIZE
    batch_windows: int = 1  # PPL windows per forward (eval.ppl): how the work is done, not what it gives
    speed: SpeedSpec | None = None
    policy_modules: list[str] = field(default_factory=list)
    # The model and revision axes (eval.scale): one sweep per pair, each run with `model` and `revision` set
    # to it. None: the one `model` / `revision`.
    models: list[str | None] | None = None
    revisions: list[str | None] | None = None
    device: str = "cpu"  # where the model runs (--device): not a YAML key, a property of the machine

    def __post_init__(self):
        self.models = [self.model] if self.models is None else self.models
        self.revisions = [self.revision] if self.revisions is None else self.revisions

    @property
    def members(self) -> list[tuple[str | None, str | None]]:
        """Every (model, revision) the sweep covers, models first."""
        return list(itertools.product(self.models, self.revisions))


@dataclass
class Grid:
    configs: list[Compressor]  # in the order of the YAML, each label once
    skipped: list[dict]  # {"compressor", "settings", "reason"} of the combinations that were not run


# The sweep files that ship with the package (eval/configs in a clone, package data when installed).
SHIPPED_CONFIGS = Path(__file__).resolve().parent / "configs"


def shipped_config_names() -> list[str]:
    return sorted(p.stem for p in SHIPPED_CONFIGS.glob("*.yaml"))


def find_config(name: str | Path) -> Path:
    """A sweep file by path, else a shipped one by name (`compact` or `compact.yaml`), so that an installed
    package runs `minipythia-eval sweep compact` from any directory."""
    path = Path(name)
    if path.is_file():
        return path
    shipped = SHIPPED_CONFIGS / (path.name if path.suffix == ".yaml" else path.name + ".yaml")
    if path.parent == Path(".") and shipped.is_file():
        return shipped
    raise ConfigError(f"sweep config {shown(str(name))} does not exist; give a YAML file or a shipped config's name "
                      f"({', '.join(shipped_config_names())})")


def load_spec(path: str | Path) -> SweepSpec:
    path = find_config(path)
    if path.stat().st_size > MAX_SPEC_BYTES:
        raise ConfigError(f"{path}: {path.stat().st_size:,} bytes is not a sweep config (at most {MAX_SPEC_BYTES:,})")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise ConfigError(f"{path} is not UTF-8 text ({e.reason} at byte {e.start})") from None
    return parse_spec(text, path)


def parse_spec(text: str, path: Path) -> SweepSpec:
    where = str(path)
    try:
        # libyaml's loader when there is one: it refuses nesting past 1000 levels at once, where the pure-Python
        # one takes seconds to reach its recursion limit.
        raw = yaml.load(text, Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        at = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise ConfigError(f"{where}: invalid YAML{at}: {shown(problem)}") from None
    except RecursionError:
        raise ConfigError(f"{where}: the YAML nests too deeply to be a sweep config") from None  # without libyaml
    if expanded_size(raw, MAX_EXPANDED_VALUES) > MAX_EXPANDED_VALUES:
        raise ConfigError(f"{where}: the YAML expands to more than {MAX_EXPANDED_VALUES:,} values (aliases repeated "
                          f"inside aliases, or one that contains itself); write the grid out plainly")
    if not isinstance(raw, dict):
        raise ConfigError(f"{where}: expected a mapping with a 'policies' list, got {type(raw).__name__}")
    unknown = sorted(set(raw) - set(TOP_KEYS))
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {', '.join(map(shown, unknown[:10]))}; "
                          f"allowed: {', '.join(TOP_KEYS)}")

    def get(key, kind, default=None, minimum=None, allow_none=False):
        value = raw.get(key, default)
        if value is None and (allow_none or key not in raw):
            return value
        if not _is(value, kind) or (minimum is not None and value < minimum):
            bound = f" >= {minimum}" if minimum is not None else ""
            raise ConfigError(f"{where}: {key} must be {kind.__name__}{bound}{' or null' if allow_none else ''}, "
                              f"got {shown(value)}")
        return value

    data = raw.get("data", "pg19")
    data = [data] if isinstance(data, str) else data
    if not isinstance(data, list) or not data or not all(isinstance(d, str) for d in data):
        raise ConfigError(f"{where}: data must be 'pg19', a directory or a list of .txt files, "
                          f"got {shown(raw['data'])}")
    dtype = get("dtype", str, "float32")
    if dtype not in DTYPES:
        raise ConfigError(f"{where}: dtype must be one of {', '.join(DTYPES)}, got {shown(dtype)}")
    modules = raw.get("policy_modules", [])
    modules = [modules] if isinstance(modules, str) else modules
    if not isinstance(modules, list) or not all(isinstance(m, str) for m in modules):
        raise ConfigError(f"{where}: policy_modules must be a list of .py files or module names, got {shown(modules)}")
    # A file is relative to the YAML's folder, so that a config and its policy travel together.
    modules = [str(path.parent / m) if m.endswith(".py") and not Path(m).is_absolute() else m for m in modules]
    try:
        import_policies(modules)  # before the policies are read: they may name the modules' compressors
    except ValueError as e:
        raise ConfigError(f"{where}: {e}") from None
    mode = get("mode", str, "window")
    if mode not in ("window", "stream"):
        raise ConfigError(f"{where}: mode must be 'window' or 'stream', got {shown(mode)}")
    if "tasks" in raw and "ppl" in raw:
        raise ConfigError(f"{where}: give tasks (e.g. [ppl, recall]) or ppl: true/false, not both")
    ppl, short_context, tasks = _tasks(raw.get("tasks", [PPL]), where)
    models, revisions = _axis(raw, "model", where), _axis(raw, "revision", where)
    if len(models) * len(revisions) > MAX_COMBINATIONS:
        raise ConfigError(f"{where}: {len(models)} models x {len(revisions)} revisions are more than "
                          f"{MAX_COMBINATIONS:,} sweeps; split them into several files")
    spec = SweepSpec(path=path, text=text, policies=_policies(raw.get("policies"), where),
                     model=models[0], revision=revisions[0], models=models, revisions=revisions, dtype=dtype, data=data,
                     books=get("books", int, minimum=1), tokenizer=get("tokenizer", str),
                     ctx_len=get("ctx_len", int, minimum=2), stride=get("stride", int, minimum=1),
                     max_tokens=get("max_tokens", int, DEFAULT_MAX_TOKENS, minimum=2, allow_none=True),
                     mode=mode, decode_interval=get("decode_interval", int, minimum=0),
                     ppl=get("ppl", bool, True) and ppl, short_context=short_context, tasks=tasks,
                     policy_modules=modules, batch_size=get("batch_size", int, DEFAULT_BATCH_SIZE, minimum=1),
                     batch_windows=get("batch_windows", int, 1, minimum=1),
                     speed=_speed(raw.get("speed"), where))
    check_spec(spec)
    return spec


def expanded_size(root, limit: int) -> int:
    """How many values `root` (YAML as loaded) holds once every alias is written out, counted only up to just past
    `limit`. The loader shares one object per anchor, so a 1 KB file of aliases of aliases can stand for 10^9
    strings, which anything walking it (a repr in an error message, a product of axes) would create. Each shared
    object is sized once, so this takes the file's time; a structure that contains itself counts as past the limit.
    Recursion is safe: the loader itself refuses nesting deeper than Python's recursion limit."""
    sizes: dict[int, int] = {}
    inside: set[int] = set()

    def size(node) -> int:
        if not isinstance(node, (list, dict)):
            return 1
        if id(node) in sizes:
            return sizes[id(node)]
        if id(node) in inside:
            return limit + 1
        inside.add(id(node))
        total = 1
        for child in (x for pair in node.items() for x in pair) if isinstance(node, dict) else node:
            total += size(child)
            if total > limit:
                break
        inside.discard(id(node))
        sizes[id(node)] = total
        return total

    return size(root)


def check_spec(spec: SweepSpec):
    """What a spec's fields must satisfy together (each field alone is checked where it is read)."""
    where = str(spec.path)
    if spec.ctx_len is not None and spec.stride is not None and spec.stride > spec.ctx_len:
        raise ConfigError(f"{where}: stride ({spec.stride}) must be <= ctx_len ({spec.ctx_len})")
    if spec.mode == "window" and spec.decode_interval is not None:
        raise ConfigError(f"{where}: decode_interval applies to mode: stream (a window's targets are scored in one "
                          f"forward, nothing is decoded)")
    if spec.mode == "stream" and (spec.stride is not None or spec.decode_interval is None):
        raise ConfigError(f"{where}: mode: stream takes decode_interval (e.g. 64) and no stride")
    if spec.mode == "stream" and spec.batch_windows > 1:
        raise ConfigError(f"{where}: batch_windows batches sliding windows (mode: window); a stream is one token at "
                          f"a time: leave batch_windows out")
    if not spec.ppl and not spec.speed and not spec.tasks:
        raise ConfigError(f"{where}: without ppl, tasks or a speed part there is nothing to do")
    if spec.tasks and spec.mode != "window":
        raise ConfigError(f"{where}: tasks other than ppl compress a prompt once (mode: window); mode: stream "
                          f"applies to PPL alone")


def spec_yaml(spec: SweepSpec) -> str:
    """The YAML of a spec built in code (python -m eval ppl / speed), kept with the results like a sweep's file:
    `python -m eval sweep` on it runs the same thing. Keys at their defaults are left out."""
    defaults = SweepSpec(path=spec.path, text="", policies=[])
    raw = {key: getattr(spec, key) for key in TOP_KEYS if key not in ("speed", "policies", "tasks", "ppl")
           and getattr(spec, key) != getattr(defaults, key)}
    if spec.tasks or not spec.ppl or spec.short_context != defaults.short_context:
        raw["tasks"] = ([{PPL: {"short_context": spec.short_context}}] if spec.ppl else []) + [
            {t.name: t.settings()} for t in spec.tasks]
    if spec.speed:
        raw["speed"] = dataclasses.asdict(spec.speed)
    raw["policies"] = [dict(compressor=p.compressor, **{k: v[0] if len(v) == 1 else v for k, v in p.axes.items()})
                       for p in spec.policies]
    return yaml.safe_dump(raw, sort_keys=False)


def _axis(raw: dict, key: str, where: str) -> list[str | None]:
    """`model` / `revision`: a name or a list of names (an axis); a revision may be null (the default one)."""
    value = raw.get(key)
    values = value if isinstance(value, list) else [value]
    nullable = key == "revision" or key not in raw
    if not values or not all(isinstance(v, str) or (v is None and nullable) for v in values):
        raise ConfigError(f"{where}: {key} must be a name or a list of names, got {shown(value)}")
    if len(set(values)) < len(values):
        raise ConfigError(f"{where}: {key} lists {shown(next(v for v in values if values.count(v) > 1))} twice")
    return values


def _is(value, kind) -> bool:
    if kind is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, kind)


def _speed(raw, where: str) -> SpeedSpec | None:
    if raw is None:
        return None
    if not isinstance(raw, dict):
        raise ConfigError(f"{where}: speed must be a mapping like {{prompt_lengths: [512, 2048], new_tokens: 32}}")
    unknown = sorted(set(raw) - set(SPEED_KEYS))
    if unknown:
        raise ConfigError(f"{where}: unknown speed key(s) {', '.join(map(shown, unknown[:10]))}; allowed: "
                          f"{', '.join(SPEED_KEYS)}")
    lengths = raw.get("prompt_lengths")
    lengths = [lengths] if _is(lengths, int) else lengths
    if not isinstance(lengths, list) or not lengths or not all(_is(n, int) and n >= 1 for n in lengths):
        raise ConfigError(f"{where}: speed.prompt_lengths must be a list of positive integers, got {shown(lengths)}")
    spec = SpeedSpec(sorted(set(lengths)))
    hf = raw.get("hf", False)
    if not isinstance(hf, bool):
        raise ConfigError(f"{where}: speed.hf must be true or false, got {shown(hf)}")
    spec.hf = hf
    for key, minimum in (("new_tokens", WARMUP_STEPS + 2), ("repeats", 1)):
        value = raw.get(key, getattr(spec, key))
        if not _is(value, int) or value < minimum:
            why = f" (the first token, {WARMUP_STEPS} warm-up steps, one timed step)" if key == "new_tokens" else ""
            raise ConfigError(f"{where}: speed.{key} must be an integer >= {minimum}{why}, got {shown(value)}")
        setattr(spec, key, value)
    return spec


def _tasks(raw, where: str) -> tuple[bool, int | None, list[Task]]:
    """`tasks`: a list of names or {name: {setting: value}} -> (whether PPL runs, its short_context, the others)."""
    entries = list(raw.items()) if isinstance(raw, dict) else raw
    if not isinstance(entries, list) or not entries:
        raise ConfigError(f"{where}: tasks must be a non-empty list such as [ppl, recall], got {shown(raw)}")
    ppl, short_context, tasks, seen = False, DEFAULT_SHORT_CONTEXT, [], set()
    for entry in entries:
        if isinstance(entry, dict) and len(entry) == 1:
            entry = next(iter(entry.items()))
        name, settings = (entry, {}) if isinstance(entry, str) else entry if isinstance(entry, tuple) else (None, None)
        settings = {} if settings is None else settings
        if not isinstance(name, str) or not isinstance(settings, dict):
            raise ConfigError(f"{where}: a task is a name or {{name: {{setting: value}}}}, got {shown(entry)}")
        if name in seen:
            raise ConfigError(f"{where}: task {name} is listed twice")
        seen.add(name)
        if name == PPL:
            unknown = sorted(set(settings) - {"short_context"})
            if unknown:
                raise ConfigError(f"{where}: task ppl has no setting {shown(unknown[0])}; its setting: short_context "
                                  f"(its windows are the top-level ctx_len, stride, max_tokens)")
            short_context = settings.get("short_context", DEFAULT_SHORT_CONTEXT)
            if short_context is not None and (not _is(short_context, int) or short_context < 1):
                raise ConfigError(f"{where}: ppl.short_context must be an integer >= 1 or null, "
                                  f"got {shown(short_context)}")
            ppl = True
            continue
        if name not in TASKS:
            raise ConfigError(f"{where}: unknown task {shown(name)}; tasks: {', '.join([PPL, *TASKS])}")
        try:
            tasks.append(build_task(name, settings))
        except (TypeError, ValueError) as e:
            raise ConfigError(f"{where}: tasks.{name}: {e}") from None
    return ppl, short_context, tasks


def _policies(raw, where: str) -> list[Policy]:
    if not isinstance(raw, list) or not raw:
        raise ConfigError(f"{where}: policies must be a non-empty list of {{compressor: NAME, setting: value(s)}}")
    policies = []
    for i, entry in enumerate(raw):
        at = f"{where}: policies[{i}]"
        if not isinstance(entry, dict) or "compressor" not in entry:
            raise ConfigError(f"{at}: expected a mapping with a 'compressor' key, got {shown(entry)}")
        name = entry["compressor"]
        if not isinstance(name, str):
            raise ConfigError(f"{at}: compressor must be a name such as snapkv, got {shown(name)}")
        cls = COMPRESSORS.get(name)
        if cls is None:
            raise ConfigError(f"{at}: unknown compressor {shown(name)}; registered: {', '.join(COMPRESSORS)} "
                              f"(a policy of "
                              f"your own: list its module in policy_modules)")
        settings = {s.name: s for s in settings_of(cls)}
        axes = {}
        for key, value in entry.items():
            if key == "compressor":
                continue
            if key not in settings:
                own = ", ".join(k for k in settings if k not in STORAGE_SETTINGS) or "none"
                raise ConfigError(f"{at}: {name} has no setting {shown(key)}; its settings: {own} (and "
                                  f"{', '.join(STORAGE_SETTINGS)}, which every policy has)")
            setting = settings[key]
            # For a sequence-valued setting a flat list is one value, a list of lists an axis.
            if setting.is_sequence:
                values = value if isinstance(value, list) and value and all(isinstance(v, list) for v in value) \
                    else [value]
            else:
                values = value if isinstance(value, list) else [value]
            if not values:
                raise ConfigError(f"{at}: {key} is an empty list; give at least one value")
            takes_policies = PolicyValued in (setting.kind, setting.element)  # a policy with settings: a mapping
            for v in values:
                if isinstance(v, dict) and not takes_policies:
                    raise ConfigError(f"{at}: {name}.{key} must be a value or a list of values, got a mapping")
                try:
                    setting.check(v, name)
                except TypeError as e:
                    raise ConfigError(f"{at}: {e}") from None
                except ValueError:
                    pass  # a value of the right type the policy rejects: that combination is skipped
            axes[key] = values
        policies.append(Policy(name, axes, i))
    combinations = sum(math.prod(len(values) for values in policy.axes.values()) for policy in policies)
    if combinations > MAX_COMBINATIONS:
        raise ConfigError(f"{where}: the policies' axes multiply to {combinations:,} configurations, more than "
                          f"{MAX_COMBINATIONS:,}; split the grid into several sweeps")
    return policies


def folder_name(label: str) -> str:
    """The label as one safe folder name: characters other than letters, digits, '.', '_' and '-' become '-', and
    so do leading dots, so that no label (a revision `..`, a model path ending in `..`) names a folder outside
    the results folder, the folder itself, or a hidden one."""
    name = re.sub(r"[^A-Za-z0-9_.-]+", "-", label)
    return re.sub(r"^\.+", lambda dots: "-" * len(dots.group()), name) or "-"


def expand(policies: list[Policy], model_config, future_known: bool = False) -> Grid:
    """Every combination of every entry, built by minipythia's builder and fitted to the model
    (Compressor.for_model); combinations the policy rejects, or that lack data (missing_input), are skipped.
    future_known: the run gives a compressor that sees the future what it needs (eval.replay: the targets that
    follow each prompt), so the oracle is not skipped for lacking it."""
    configs, skipped, seen = [], [], {}
    for policy in policies:
        keys = list(policy.axes)
        for values in itertools.product(*(policy.axes[k] for k in keys)):
            settings = dict(zip(keys, values))
            try:
                compressor = build_compressor(policy.compressor, settings)
                compressor.for_model(model_config)
                if not (future_known and compressor.sees_future):
                    compressor.check_input()
            except ValueError as e:
                skipped.append(dict(compressor=policy.compressor, settings=settings, reason=str(e)))
                continue
            except TypeError as e:  # a required setting left out
                raise ConfigError(f"policies[{policy.index}] ({policy.compressor}, {settings}): {e}") from None
            folder = folder_name(compressor.label)
            if folder in seen:
                skipped.append(dict(compressor=policy.compressor, settings=settings,
                                    reason=f"the same configuration as an earlier entry ({seen[folder]})"))
                continue
            seen[folder] = compressor.label
            configs.append(compressor)
    return Grid(configs, skipped)


def distance_from_defaults(compressor: str, settings: dict) -> int:
    """How many settings differ from the policy's defaults (0 when the policy is no longer registered):
    among variants of one budget, the closest to the defaults stands for them in plots and checks."""
    cls = COMPRESSORS.get(compressor)
    if cls is None:
        return 0
    defaults = {s.name: list(s.default) if isinstance(s.default, tuple) else s.default for s in settings_of(cls)}
    return sum(1 for k, v in settings.items() if k in defaults and defaults[k] != v)
