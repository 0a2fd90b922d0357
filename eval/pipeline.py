"""The one orchestrator of evaluations: a spec (eval.grid, parsed and expanded) flows one way through it.

    spec -> inputs (books, model, tokenizer, the grid fitted to the model: load_inputs)
         -> plan (eval.sweep.plan_sweep: the folder's configurations written, the units still to do)
         -> execute (here one after the other, or on Ray: eval.executors)
         -> results (appended in plan order: eval.results) -> report (eval.report; eval.scale across models)

`run_spec` is what every command runs (`python -m eval sweep|ppl|task|speed` build a spec and call it), and
what a benchmark or a notebook calls: one sweep, or one per (model, revision) when the spec lists several.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import sys
from pathlib import Path

from minipythia import Tokenizer
from minipythia.cli import check_device, check_tokenizer, load_for_inference, resolve_model
from minipythia.weights import read_config

from .data import DataError, load_books
from .executors import RayCluster
from .grid import ConfigError, SweepSpec, expand
from .ppl import default_windows
from .results import locked
from .scale import is_scale_folder, member_folders, write_index, write_scale_report
from .sweep import SweepInputs, plan_sweep, prepare_out, run_sweep

LOCAL = "local"  # --ray without an address
HOW_TO_ADD_PPL = ("No PPL: {reason}. To add it, rerun with --data DIR (a directory of .txt books, e.g. "
                  "../shared/data/pg19-test) or PG19_DIR set, and another --out (make eval DATA=DIR "
                  "OUT=results/eval-books): this folder's tasks ran on sampled text.")


def warn_positions(model, length: int, what: str):
    if length > model.config.max_position_embeddings:
        print(f"warning: {what} {length} > the model's {model.config.max_position_embeddings} trained positions: "
              f"dense-attention PPL degrades sharply beyond them", file=sys.stderr)


def run_spec(spec: SweepSpec, out: Path, command: str, ray: str | None = None, workers: int | None = None) -> Path:
    """Loads what the spec names (books, model, tokenizer), fills what depends on the model, runs the sweep:
    one per (model, revision) when the spec lists several (eval.scale), on Ray when `ray` is given (LOCAL or
    an address). The results folder is checked and locked first, so that nothing is loaded for a run that
    cannot write."""
    if workers is not None and ray is None:
        raise ValueError("--workers sizes the local Ray cluster of --ray; add --ray or leave --workers out")
    check_device(spec.device)
    prepare_out(out)
    with locked(out):
        folders = member_folders(spec.members) if len(spec.members) > 1 else None
        if folders and (out / "sweep.json").is_file():
            raise ConfigError(f"{out} holds a sweep of one model; a sweep over models or revisions needs a folder "
                              f"of its own: give another --out")
        if not folders and is_scale_folder(out):
            raise ConfigError(f"{out} holds a sweep over models or revisions; give another --out")
        with RayCluster(None if ray == LOCAL else ray, workers) if ray else contextlib.nullcontext() as cluster:
            if not folders:
                return run_one(spec, out, command, cluster)
            write_index(out, str(spec.path), spec.text, folders)
            members = [(dataclasses.replace(spec, model=model, revision=revision, models=[model],
                                            revisions=[revision]), out / folder)
                       for (model, revision), folder in folders.items()]
            if cluster is None:  # one member after the other, each model loaded once
                for member, folder in members:
                    print(f"== {member.model} @ {member.revision or 'main'} -> {folder}", file=sys.stderr)
                    run_one(member, folder, command)
            else:
                run_members_on(cluster, members, command)
        path = write_scale_report(out)
        print(f"report over models and revisions: {path}")
        return path


def run_one(spec: SweepSpec, out: Path, command: str, cluster: RayCluster | None = None) -> Path:
    return run_sweep(load_inputs(spec), out, command, cluster)


def run_members_on(cluster: RayCluster, members: list[tuple[SweepSpec, Path]], command: str):
    """Every member's units on the cluster at once, so that the sizes and checkpoints of a grid run side by side:
    each member is planned here in turn (its model loaded, then let go), then they all run, then each is
    finished (its speed part with its model loaded again, its report)."""
    with contextlib.ExitStack() as folders_locked:
        planned = []
        for member, folder in members:
            print(f"== planning {member.model} @ {member.revision or 'main'} -> {folder}", file=sys.stderr)
            prepare_out(folder)
            folders_locked.enter_context(locked(folder))
            inputs = load_inputs(member)
            planned.append((inputs.spec, plan_sweep(inputs, folder, command)))
            del inputs  # the workers load their own model: the driver holds one at a time
        cluster.run([p.job for _, p in planned])
        for spec, p in planned:
            p.finish(load_for_inference(Path(p.job.source.directory), spec.dtype, spec.device) if spec.speed
                     else None)


def load_inputs(spec: SweepSpec) -> SweepInputs:
    """What a spec names, loaded (books, model, tokenizer), and what depends on the model filled in: the spec's
    model, revision and windows as really used, and its grid expanded for the model (once: the plan takes it)."""
    ppl_skipped = None
    try:
        books = load_books(spec.data, spec.books) if spec.data else []
    except DataError as e:  # no data is no reason to skip the speed part or the tasks (on sampled text)
        # "No data" is only the default PG-19 that cannot be had (no PG19_DIR, the hub unreachable): a path the
        # user named that is not there is a mistake, not a reason to run less.
        no_data = spec.data == ["pg19"] and not os.environ.get("PG19_DIR")
        if not no_data or not (spec.speed or spec.tasks) or not spec.ppl:
            raise
        books, ppl_skipped = [], HOW_TO_ADD_PPL.format(reason=str(e).rstrip("."))
        print(ppl_skipped, file=sys.stderr)
    if not spec.ppl:
        ppl_skipped = "No PPL: this run measured speed only."
    choice = resolve_model(spec.model, spec.revision)
    config = read_config(choice.directory)  # what can be checked before the weights load
    # PPL windows and tasks teacher-force the tokens after each prompt: the oracle can see them (eval.replay).
    grid = expand(spec.policies, config, future_known=spec.mode == "window" and bool(spec.ppl or spec.tasks))
    if not grid.configs:
        raise ConfigError(f"{spec.path}: every configuration was skipped ({grid.skipped[0]['reason']})")
    tokenizer = Tokenizer.from_pretrained(spec.tokenizer or choice.directory)
    check_tokenizer(tokenizer, config)
    model = load_for_inference(choice.directory, spec.dtype, spec.device)
    # What was really used goes into the results: the default model, and windows that depend on the model.
    spec.model, spec.revision = choice.name, choice.revision
    if spec.mode == "window":
        spec.ctx_len, spec.stride = default_windows(model, spec.ctx_len, spec.stride)
    else:
        spec.ctx_len = default_windows(model, spec.ctx_len, None)[0]
    if spec.ppl:
        warn_positions(model, spec.ctx_len, "ctx_len")
    if spec.speed:
        warn_positions(model, max(spec.speed.prompt_lengths), "speed prompt length")
    return SweepInputs(spec, books, model, tokenizer, choice.directory, grid, ppl_skipped)
