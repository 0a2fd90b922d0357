"""python -m eval {sweep, ppl, task, speed, report, bench, kept}: the command-line front of the eval package.

`sweep` runs a YAML grid (over models and revisions too: eval.scale; on Ray with --ray: eval.executors);
`ppl`, `task` and `speed` are the same engine with a grid of one compressor written from flags, and write the
same folder layout (OUT/sweep.json, OUT/<label>/...), which `report` reads. `kept` writes OUT/kept.html: what
each policy kept of one task prompt (eval.kept), which the folder's report links to.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import shlex
import sys
from pathlib import Path

import yaml

from minipythia import NoCompression, Oracle
from minipythia.bounded import shown
from minipythia.cli import (add_compressor_args, add_model_args, check_device, compressor_from_args, resolve_model,
                            run_cli)
from minipythia.weights import DTYPES

from .bench import bench_table, run_bench
from .budget import UNITS
from .data import check_max_tokens
from .grid import (MAX_EXPANDED_VALUES, Policy, SpeedSpec, SweepSpec, check_spec, expanded_size,
                   load_spec, parse_spec, spec_yaml)
from .kept import TASKS_WITH_EVIDENCE, kept_page, write_kept_page
from .ppl import check_window_args
from .pipeline import LOCAL, load_inputs, run_spec
from .report import load_sweep, ppl_tables, speed_table, task_table, write_report
from .results import contained, locked, read_json
from .scale import is_scale_folder, write_scale_report
from .speed import check_speed_args
from .stream import check_stream_args
from .sweep import prepare_out, task_text
from .tasks import TASKS, build_task

def int_list(text: str) -> list[int]:
    try:
        values = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected positive integers, got {text!r}")
    return values


def add_data_args(parser, required: bool):
    parser.add_argument("--data", nargs="+", required=required, metavar="pg19|wikitext-2|hf:NAME|DIR|FILE",
                        help="'pg19' ($PG19_DIR, else the HF test split), 'wikitext-2' or 'wikitext-103' (the raw test "
                             "split as one text), hf:NAME[:CONFIG][#COLUMN] (a hub or local dataset, a book per row), "
                             "a directory of .txt books, or .txt files")
    parser.add_argument("--books", type=int, default=None, help="only the first N books")
    parser.add_argument("--tokenizer", default=None, help="tokenizer.json (default: the one in the checkpoint)")


def build_parser(argv) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m eval", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("sweep", help="PPL (and speed) of a grid of policies and settings from a YAML file: a folder "
                                     "per configuration in OUT, and OUT/report.md")
    p.add_argument("config", help="the sweep's YAML file, e.g. eval/configs/compact.yaml (format: eval/grid.py), "
                                  "or a shipped config's name: compact, full, ...")
    p.add_argument("--out", default=None, help="results directory (default: results/<config name>); a rerun "
                                               "resumes, skipping the configurations already complete")
    p.add_argument("--model", nargs="+", default=None, help="overrides the config's model(s)")
    p.add_argument("--revision", nargs="+", default=None, help="overrides the config's revision(s)")
    p.add_argument("--dtype", choices=list(DTYPES), default=None, help="overrides the config's dtype")
    p.add_argument("--device", default="cpu", help="where the model runs: cpu, cuda or cuda:N")
    p.add_argument("--batch-windows", type=int, default=None, metavar="N",
                   help="overrides the config's batch_windows: PPL windows scored N at a time (the same NLLs)")
    p.add_argument("--ray", nargs="?", const=LOCAL, default=None, metavar="ADDRESS",
                   help="run the units on Ray (pip install 'minipythia[ray]'): on the cluster at ADDRESS, or without "
                        "one on a local cluster of --workers CPUs on 127.0.0.1")
    p.add_argument("--workers", type=int, default=None, help="--ray without an address: the local cluster's CPUs "
                                                              "(default: this machine's)")
    p.add_argument("--kept", action="store_true",
                   help="also write OUT/kept.html (as python -m eval kept): what each configuration kept of the first "
                        "example of the sweep's recall (else needle, else a default recall) task, against the oracle")
    add_data_args(p, required=False)

    p = sub.add_parser("ppl", help="perplexity of one compressor (a sweep of one): OUT/<label>/ppl.jsonl, OUT/report.md")
    add_model_args(p)
    add_data_args(p, required=True)
    p.add_argument("--max-tokens", type=int, default=None, help="score only each book's first N tokens")
    p.add_argument("--ctx-len", type=int, default=None,
                   help="window length (default: the model's trained length, at most 2048)")
    p.add_argument("--stride", type=int, default=None, help="targets scored per window (default: ctx_len / 4)")
    p.add_argument("--mode", choices=["window", "stream"], default="window",
                   help="window: sliding windows, each prompt compressed once (default); stream: token by token, "
                        "compressing during decoding every --decode-interval, restarting every --ctx-len tokens")
    p.add_argument("--batch-windows", type=int, default=1, metavar="N",
                   help="windows scored N at a time, one batch row each (the same NLLs; for GPUs)")
    add_compressor_args(p, argv, decode_interval=True)
    p.add_argument("--out", required=True, help="results directory (reruns skip the entries already there)")

    p = sub.add_parser("task", help="one task (recall, needle, continuation) of one compressor: "
                                    "OUT/<label>/<task>.jsonl, OUT/report.md")
    p.add_argument("task", choices=list(TASKS), help="the task (eval/tasks/)")
    p.add_argument("--set", dest="task_settings", action="append", default=[], metavar="SETTING=VALUE",
                   help="a task setting, as in a sweep's YAML, e.g. --set contexts=[256,512] --set trials=4")
    add_model_args(p)
    add_data_args(p, required=False)
    add_compressor_args(p, argv)
    p.add_argument("--out", required=True, help="results directory (reruns skip the examples already there)")

    p = sub.add_parser("speed", help="TTFT, TPOT, KV bytes of none vs a compressor, interleaved: OUT/<label>/speed.jsonl")
    add_model_args(p)
    p.add_argument("--prompt-lens", type=int_list, default=[512, 1024, 2048], help="e.g. 512,1024,2048")
    p.add_argument("--new-tokens", type=int, default=64, help="greedy tokens generated after each prompt")
    p.add_argument("--repeats", type=int, default=3, help="runs per (prompt, config); medians are reported")
    p.add_argument("--hf", action="store_true", help="also time transformers' generate on the same checkpoint")
    add_compressor_args(p, argv)
    add_data_args(p, required=False)
    p.add_argument("--out", required=True)

    p = sub.add_parser("report", help="regenerate DIR/report.md and DIR/plots/ from a results folder")
    p.add_argument("dir")
    p.add_argument("--budget", choices=UNITS, default="auto",
                   help="x axis of the quality-vs-budget plots: KV entries kept per head, or the KV bytes the cache "
                        "holds (auto: bytes when some configuration is quantized)")
    p.add_argument("--baseline", metavar="LABEL",
                   help="also compare every configuration with this one (paired intervals of the differences, in "
                        "report.md and summary.csv), beside full KV")

    p = sub.add_parser("bench", help="minipythia vs transformers: TTFT, TPOT, bandwidth, in one run (make bench)")
    add_model_args(p)
    p.add_argument("--dtypes", default="float32,bfloat16", help="comma-separated, e.g. float32,bfloat16")
    p.add_argument("--prompt-lens", type=int_list, default=[128, 1024, 2048], help="e.g. 128,1024,2048")
    p.add_argument("--new-tokens", type=int, default=32, help="greedy tokens generated after each prompt")
    p.add_argument("--repeats", type=int, default=3, help="runs per prompt; medians are reported")
    p.add_argument("--no-hf", action="store_true", help="skip transformers even when it is installed")
    p.add_argument("--sweep-tokens", type=int, default=4096,
                   help="tokens for the shared-prefill sweep timing (0 skips it)")
    p.add_argument("--out", default="results/bench")

    p = sub.add_parser("kept", help="what each policy kept of one task prompt, against the oracle: OUT/kept.html, a "
                                    "self-contained page (no server, no network)")
    p.add_argument("--task", default="recall", help="the task whose example is shown: recall (default) or needle")
    p.add_argument("--set", dest="task_settings", action="append", default=[], metavar="SETTING=VALUE",
                   help="a task setting, as for `python -m eval task`, e.g. --set contexts=[960] --set depths=[0.5]")
    p.add_argument("--example", type=int, default=0,
                   help="which of the task's examples, in the order a sweep scores them (default 0, the first)")
    p.add_argument("--config", default="kept", help="the sweep YAML whose policies are shown, or a shipped config's "
                                                    "name (default: kept, eval/configs/kept.yaml)")
    p.add_argument("--policies", action="append", default=[], metavar="YAML",
                   help="policies as in a sweep's policies list, e.g. '[{compressor: snapkv, max_capacity_prompt: "
                        "256}, streaming_llm]': a list, one entry or a name (repeatable; replaces --config's)")
    add_model_args(p)
    add_data_args(p, required=False)
    p.add_argument("--out", required=True, help="results directory for kept.html (a sweep's folder: its report "
                                                "then links to the page)")
    return parser


def one_policy(compressor) -> Policy:
    return Policy(compressor.name, {k: [v] for k, v in compressor.settings().items()}, 0)


def check_batch_windows(n: int | None):
    if n is not None and n < 1:
        raise ValueError(f"--batch-windows must be >= 1 (windows scored together), got {n}")


def cmd_sweep(args, command: str):
    check_batch_windows(args.batch_windows)
    spec = load_spec(args.config)  # a bad config fails here, before the model loads
    for key in ("dtype", "data", "books", "tokenizer", "batch_windows"):
        if getattr(args, key) is not None:
            setattr(spec, key, getattr(args, key))
    if args.model is not None:
        spec.models, spec.model = args.model, args.model[0]
    if args.revision is not None:
        spec.revisions, spec.revision = args.revision, args.revision[0]
    spec.device = args.device
    check_spec(spec)  # what the overrides changed (batch_windows with mode: stream)
    if args.kept and len(spec.members) > 1:
        raise ValueError("--kept draws the page of one model and revision; this sweep has several: run python -m eval "
                         "kept --model M --revision R --out DIR on the one you want")
    out = Path(args.out) if args.out else Path("results") / spec.path.stem
    run_spec(spec, out, command, args.ray, args.workers)
    if args.kept:
        # The sweep's own recall or needle settings, so that the page shows an example the sweep scored.
        task = next((t for name in TASKS_WITH_EVIDENCE for t in spec.tasks if t.name == name),
                    build_task(TASKS_WITH_EVIDENCE[0], {}))
        write_kept(dataclasses.replace(spec, tasks=[task]), 0, out, command)


def cmd_ppl(args, command: str):
    check_window_args(args.ctx_len, args.stride)
    check_batch_windows(args.batch_windows)
    check_max_tokens(args.max_tokens)
    compressor = compressor_from_args(args)
    check_stream_args(args.mode, args.stride, compressor, args.decode_interval)
    spec = SweepSpec(path=Path("command line"), text="", policies=[one_policy(compressor)], model=args.model,
                     revision=args.revision, dtype=args.dtype, data=args.data, books=args.books,
                     tokenizer=args.tokenizer, ctx_len=args.ctx_len, stride=args.stride, max_tokens=args.max_tokens,
                     mode=args.mode, decode_interval=args.decode_interval if args.mode == "stream" else None,
                     batch_size=1, batch_windows=args.batch_windows, policy_modules=args.policy_module,
                     device=args.device)
    spec.text = spec_yaml(spec)
    check_spec(spec)
    out = run_spec(spec, Path(args.out), command).parent
    print(ppl_tables(load_sweep(out).ppl))


def task_settings(pairs: list[str]) -> dict:
    """--set KEY=VALUE pairs, each value read as YAML (so that lists and numbers are what a sweep file gives)."""
    settings = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise ValueError(f"--set takes SETTING=VALUE (e.g. --set trials=4), got {shown(pair)}")
        try:
            settings[key.strip()] = yaml.safe_load(value)
        except (yaml.YAMLError, RecursionError):
            raise ValueError(f"--set {shown(pair)}: the value is not valid YAML") from None
        if expanded_size(settings[key.strip()], MAX_EXPANDED_VALUES) > MAX_EXPANDED_VALUES:
            raise ValueError(f"--set {shown(key)}: the value expands to more than {MAX_EXPANDED_VALUES:,} values")
    return settings


def cmd_task(args, command: str):
    task = build_task(args.task, task_settings(args.task_settings))
    compressor = compressor_from_args(args)
    spec = SweepSpec(path=Path("command line"), text="", policies=[one_policy(compressor)], model=args.model,
                     revision=args.revision, dtype=args.dtype, data=args.data or [], books=args.books,
                     tokenizer=args.tokenizer, ppl=False, tasks=[task], batch_size=1,
                     policy_modules=args.policy_module, device=args.device)
    spec.text = spec_yaml(spec)
    check_spec(spec)
    out = run_spec(spec, Path(args.out), command).parent
    results = load_sweep(out)
    print(task_table(results.tasks, results.configs, results.ppl))


def cmd_speed(args, command: str):
    check_speed_args(args.new_tokens, args.repeats)
    compressor = compressor_from_args(args)
    # No compression is every speed row's reference, measured interleaved with the compressor.
    reference = Policy(NoCompression.name, {}, 0)
    policies = [reference] + ([one_policy(compressor)] if not isinstance(compressor, NoCompression) else [])
    spec = SweepSpec(path=Path("command line"), text="", policies=policies, model=args.model, revision=args.revision,
                     dtype=args.dtype, data=args.data or ["pg19"], books=args.books, tokenizer=args.tokenizer,
                     max_tokens=None, ppl=False, batch_size=len(policies), policy_modules=args.policy_module,
                     device=args.device,
                     speed=SpeedSpec(sorted(set(args.prompt_lens)), args.new_tokens, args.repeats, args.hf))
    spec.text = spec_yaml(spec)
    if not args.data:  # random prompts: no data is needed
        spec.data = []
    out = run_spec(spec, Path(args.out), command).parent
    print(speed_table(load_sweep(out).speed))


def cmd_bench(args):
    dtypes = [d for d in args.dtypes.split(",") if d]
    unknown = [d for d in dtypes if d not in DTYPES]
    if unknown or not dtypes:
        raise ValueError(f"--dtypes {args.dtypes!r}: choose among {', '.join(DTYPES)}")
    check_speed_args(args.new_tokens, args.repeats)
    if args.sweep_tokens < 0:
        raise ValueError(f"--sweep-tokens must be >= 0 (0 skips the sweep timing), got {args.sweep_tokens}")
    check_device(args.device)
    prepare_out(Path(args.out))
    directory = resolve_model(args.model, args.revision).directory
    result = run_bench(directory, dtypes, args.prompt_lens, args.new_tokens, args.repeats, not args.no_hf,
                       Path(args.out), args.sweep_tokens, args.device)
    print(bench_table(result))
    print(f"results: {Path(args.out) / 'bench.md'}")


def kept_policies(config: str, given: list[str]) -> list[Policy]:
    """The policies `kept` shows: those of --policies (YAML: a list of a sweep's policies entries, one entry, or a
    name), else --config's."""
    if not given:
        return load_spec(config).policies
    entries = []
    for text in given:
        try:
            value = yaml.safe_load(text)
        except (yaml.YAMLError, RecursionError):
            raise ValueError(f"--policies {shown(text)}: not valid YAML; give e.g. "
                             f"'[{{compressor: snapkv, max_capacity_prompt: 256}}, streaming_llm]'") from None
        entries += [{"compressor": v} if isinstance(v, str) else v for v in (value if isinstance(value, list)
                                                                              else [value])]
    return parse_spec(yaml.safe_dump({"policies": entries}), Path("--policies")).policies


def cmd_kept(args, command: str):
    if args.task not in TASKS_WITH_EVIDENCE:
        raise ValueError(f"--task {shown(args.task)}: kept shows an example of {' or '.join(TASKS_WITH_EVIDENCE)} "
                         f"(the tasks whose examples say where the evidence is)")
    task = build_task(args.task, task_settings(args.task_settings))
    if args.example < 0:
        raise ValueError(f"--example must be >= 0 (the index of one of the task's examples), got {args.example}")
    spec = SweepSpec(path=Path("command line"), text="", policies=kept_policies(args.config, args.policies),
                     model=args.model, revision=args.revision, dtype=args.dtype, data=args.data or [],
                     books=args.books, tokenizer=args.tokenizer, ppl=False, tasks=[task], device=args.device)
    out = Path(args.out)
    prepare_out(out)
    write_kept(spec, args.example, out, command)


def write_kept(spec: SweepSpec, index: int, out: Path, command: str):
    """OUT/kept.html: example `index` of the spec's one task, with the spec's policies, model and data (eval.kept);
    in a sweep's folder, its report rewritten to link to it."""
    inputs = load_inputs(spec)  # the model, the tokenizer, the books and the grid, as a sweep loads them
    task = spec.tasks[0]
    text = task_text(inputs.books, inputs.tokenizer, inputs.model)
    examples = task.examples(text, inputs.model)
    if index >= len(examples):
        raise ValueError(f"--example {index}: {task.name} has {len(examples)} examples with these settings "
                         f"(0 to {len(examples) - 1}); give a smaller index, or more with --set")
    example = examples[index]
    for entry in inputs.grid.skipped:
        if entry["compressor"] != Oracle.name:
            print(f"skipped {entry['compressor']} {shown(entry['settings'])}: {entry['reason']}", file=sys.stderr)
    about = [f"{inputs.spec.model} ({inputs.model.num_parameters():,} parameters, {spec.dtype}); {task.name} "
             f"example {index} of {len(examples)}: {json.dumps(example.key)}, a {example.prompt.numel()}-token "
             f"prompt; {', '.join(f'{k}: {v}' for k, v in example.info.items())}",
             f"Text: {text.origin}.", f"Written by: {command}"]
    page = kept_page(inputs.model, inputs.tokenizer, task, example, inputs.grid, about,
                     f"What each policy kept: {task.name} example {index}")
    print(f"page: {write_kept_page(out, page)}")
    if (out / "sweep.json").is_file():  # a sweep's folder: its report links to the page
        swept = read_json(out / "sweep.json").get("model")
        if swept != inputs.spec.model:
            print(f"note: {out} holds a sweep of {swept}; the page shows {inputs.spec.model} (--model to match)",
                  file=sys.stderr)
        with locked(out):
            print(f"report: {write_report(out)}")


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    args = build_parser(argv).parse_args(argv)
    command = "python -m eval " + shlex.join(argv)
    if args.command == "sweep":
        cmd_sweep(args, command)
    elif args.command == "ppl":
        cmd_ppl(args, command)
    elif args.command == "task":
        cmd_task(args, command)
    elif args.command == "speed":
        cmd_speed(args, command)
    elif args.command == "bench":
        cmd_bench(args)
    elif args.command == "kept":
        cmd_kept(args, command)
    else:
        if not Path(args.dir).is_dir():
            raise ValueError(f"results directory {args.dir!r} does not exist")
        with locked(args.dir):  # not while a run writes into it
            if is_scale_folder(Path(args.dir)):
                for member in read_json(Path(args.dir) / "scale.json")["members"]:
                    folder = contained(Path(args.dir), member.get("folder"),
                                       f"{Path(args.dir) / 'scale.json'}: members[].folder")
                    if (folder / "sweep.json").is_file():
                        write_report(folder, args.budget, args.baseline)
                print(write_scale_report(Path(args.dir)))
            else:
                print(write_report(args.dir, args.budget, args.baseline))


def cli():
    """The console script (pyproject.toml's [project.scripts])."""
    sys.exit(run_cli(main))


if __name__ == "__main__":
    cli()
