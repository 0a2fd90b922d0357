"""What the command-line tools share: model options, compressor options, and clean errors.

The compressor options come from the registry: `--compressor NAME` and one flag per setting of any
registered policy (`window_size` -> `--window-size`; `--compressor-NAME` where the command has a `--NAME`
of its own, as generate's `--seed`), so a new policy's settings appear here by themselves.
`--policy-module FILE.py|MODULE` loads policies registered outside the package first.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from dataclasses import dataclass
from pathlib import Path

from .compressors import COMPRESSORS, Compressor, NoCompression, build_compressor, import_policies, policy_class
from .compressors.registry import decoding_policies
from .compressors.settings import Policy, Setting, settings_of
from .config import PythiaConfig
from .model import Pythia
from .weights import DEFAULT_MODEL, DTYPES, EMBEDDED_MODEL, ModelNotFoundError, resolve


def add_model_args(parser: argparse.ArgumentParser):
    parser.add_argument("--model", default=None,
                        help=f"checkpoint directory, registry name (pythia-70m-deduped) or hub id (default: "
                             f"{DEFAULT_MODEL} when cached or reachable, else the embedded {EMBEDDED_MODEL.name})")
    parser.add_argument("--revision", default=None, help="hub revision, e.g. step3000 (training checkpoints); for a "
                                                          "local directory, its subfolder of that name")
    parser.add_argument("--dtype", choices=list(DTYPES), default="float32")
    parser.add_argument("--device", default="cpu", help="where the model runs: cpu, cuda or cuda:N")


@dataclass
class ModelChoice:
    directory: Path  # the checkpoint directory
    name: str  # what the results say was used: --model as given, or the default that was taken
    revision: str | None


def resolve_model(model: str | None, revision: str | None = None) -> ModelChoice:
    """The checkpoint `--model` names; with none, Pythia-70M when it can be had, else the small model that
    ships in weights/ (with a one-line note)."""
    if model is not None:
        local = Path(model).expanduser()
        if revision is not None and local.is_dir():
            # A local copy of several training checkpoints holds one checkpoint folder per revision.
            if not (local / revision / "config.json").is_file():
                raise ValueError(f"--revision {revision}: {model} is a local directory without a checkpoint folder "
                                 f"{revision}/ (a local model's revisions are its subfolders, "
                                 f"{model}/{revision}/config.json); leave --revision out or add that folder")
            return ModelChoice(resolve(local / revision), model, revision)
        return ModelChoice(resolve(model, revision), model, revision)
    try:
        return ModelChoice(resolve(DEFAULT_MODEL, revision), DEFAULT_MODEL, revision)
    except ModelNotFoundError as e:
        if not (EMBEDDED_MODEL / "config.json").is_file():
            raise
        print(f"note: {DEFAULT_MODEL} is neither cached nor reachable ({str(e).split(';')[0]}); using the "
              f"embedded {EMBEDDED_MODEL.name} ({EMBEDDED_MODEL}) instead", file=sys.stderr)
        return ModelChoice(EMBEDDED_MODEL, f"weights/{EMBEDDED_MODEL.name}", None)


def check_device(device: str) -> str:
    """--device as torch names it: cpu, cuda or cuda:N of a CUDA device this machine has."""
    import torch

    if device == "cpu":
        return device
    if not device.startswith("cuda") or not (device == "cuda" or device[5:].isdigit() and device[4] == ":"):
        raise ValueError(f"--device {device!r}: give cpu, cuda or cuda:N")
    if not torch.cuda.is_available():
        raise ValueError(f"--device {device}: this machine has no CUDA device; use --device cpu")
    index = int(device[5:]) if ":" in device else 0
    if index >= torch.cuda.device_count():
        raise ValueError(f"--device {device}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    return device


def load_for_inference(directory: Path, dtype: str, device: str = "cpu") -> Pythia:
    return Pythia.from_pretrained(directory, dtype=DTYPES[dtype], device=check_device(device)).for_inference()


def check_tokenizer(tokenizer, config: PythiaConfig):
    """A tokenizer whose ids run past the model's vocabulary belongs to another checkpoint."""
    if tokenizer.vocab_size > config.vocab_size:
        raise ValueError(f"the tokenizer {tokenizer.path} has {tokenizer.vocab_size} tokens but the model's vocabulary "
                         f"has {config.vocab_size}: give the tokenizer of this checkpoint")


def add_compressor_args(parser: argparse.ArgumentParser, argv=None, decode_interval: bool = False):
    """--compressor and the flags of every registered policy's settings (policies named by --policy-module
    in argv, default sys.argv, are loaded first); with decode_interval, also --decode-interval."""
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--policy-module", action="append", default=[])
    import_policies(pre.parse_known_args(sys.argv[1:] if argv is None else argv)[0].policy_module)

    g = parser.add_argument_group("KV-cache compression (each setting applies to the policies its help names)")
    g.add_argument("--policy-module", action="append", default=[], metavar="FILE.py|MODULE",
                   help="load compressors registered in this file or module (repeatable)")
    g.add_argument("--compressor", choices=list(COMPRESSORS), default=NoCompression.name)
    users: dict[str, list[tuple[str, Setting]]] = {}
    for name, cls in COMPRESSORS.items():
        for setting in settings_of(cls):
            users.setdefault(setting.name, []).append((name, setting))
    flags = {}
    for setting_name, used_by in users.items():
        flag = "--" + setting_name.replace("_", "-")
        if flag in parser._option_string_actions:  # the command's own option (generate's --seed)
            flag = "--compressor-" + setting_name.replace("_", "-")
        flags[setting_name] = flag
        by_default: dict[str, list[str]] = {}
        for policy, s in used_by:
            by_default.setdefault(_shown(s.default), []).append(policy)
        described = "; ".join(f"{', '.join(policies) if len(policies) < len(COMPRESSORS) else 'every policy'} "
                              f"(default {default})" for default, policies in by_default.items())
        choices = next((s.choices for _, s in used_by if s.choices), None)
        g.add_argument(flag, dest=f"setting_{setting_name}", default=None, metavar=_metavar(used_by[0][1]),
                       help=described + (f"; one of {', '.join(map(str, choices))}" if choices else ""))
    parser.set_defaults(setting_flags=flags)
    if decode_interval:
        g.add_argument("--decode-interval", type=int, default=None, metavar="N",
                       help=f"also compress during decoding: whenever a layer holds more than its budget + N "
                            f"entries, compress it back to the budget ({', '.join(decoding_policies())})")


def compressor_from_args(args: argparse.Namespace) -> Compressor:
    """The compressor the options name, built from the settings given (the others keep the policy's
    defaults). A setting flag the chosen policy does not have, a value it cannot take, or a policy that
    needs more than a command line gives is a ValueError."""
    cls = policy_class(args.compressor)
    own = {s.name: s for s in settings_of(cls)}
    given = {name: getattr(args, f"setting_{name}") for name in args.setting_flags
             if getattr(args, f"setting_{name}") is not None}
    stray = [name for name in given if name not in own]
    if stray:
        mine = ", ".join(args.setting_flags[n] for n in own) or "none"
        raise ValueError(f"{args.setting_flags[stray[0]]} does nothing with --compressor {args.compressor} "
                         f"(its settings: {mine}); leave it out or choose the policy it belongs to")
    try:
        compressor = build_compressor(args.compressor,
                                      {name: _parse(own[name], text, args.setting_flags[name])
                                       for name, text in given.items()})
    except TypeError as e:
        raise ValueError(str(e)) from None
    compressor.check_input()
    return compressor


def _parse(setting: Setting, text: str, flag: str):
    """A flag's text as the setting's type: a tuple is comma-separated ('0,1'), a bool true/false."""
    def one(kind, item):
        if kind is Policy:
            return item  # a registered name (settings of its own: from Python or a sweep's YAML)
        if kind is bool:
            if item.lower() not in ("true", "false"):
                raise ValueError(f"{flag} takes true or false, got {item!r}")
            return item.lower() == "true"
        try:
            return kind(item)
        except ValueError:
            raise ValueError(f"{flag} takes {'an' if kind is int else 'a'} {kind.__name__}, got {item!r}") from None

    if setting.optional and text.lower() == "none":
        return None
    if setting.is_sequence:
        return tuple(one(setting.element, item) for item in text.split(",") if item.strip())
    return one(setting.kind, text)


def _shown(default) -> str:
    if default is dataclasses.MISSING:
        return "required"
    if isinstance(default, tuple):
        return ",".join(map(str, default)) or "none"
    return str(default)


def _metavar(setting: Setting) -> str:
    if setting.is_sequence:
        return f"{setting.element.__name__.upper()},..."
    return setting.kind.__name__.upper()


def run_cli(main, argv=None) -> int:
    """Runs a CLI entry point; bad input (ValueError, missing file) is one line on stderr and exit code 2."""
    try:
        return main(argv) or 0
    except (ValueError, OSError) as e:  # OSError: a file missing, unreadable, in the way
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
