"""python -m eval sweep CONFIG.yaml: PPL (and, optionally, speed) of every configuration of a grid.

    OUT/sweep.json            settings, the YAML, the configurations, the skipped ones with the reason, each run
    OUT/<label>/config.json   the compressor, its settings, its KV budget, the sweep's settings
    OUT/<label>/ppl.jsonl     one record per book (eval.ppl.book_records)
    OUT/<label>/speed.jsonl   one row per prompt length (eval.speed.measure's), with `reference`: no compression
                              measured in the same run, interleaved with it
    OUT/<label>/<task>.jsonl  one record per example of each task beyond PPL (eval.tasks.example_records)
    OUT/units.jsonl           the run's log: each unit's time, threads, device, host and process
    OUT/report.md, OUT/plots/ (eval.report)

Identical tokens: every configuration scores the same books, truncation and windows, and configurations are
scored `batch_size` at a time over one prefill per window (eval.ppl), whose per-token NLLs equal separate runs'.
A batch holds one window's prefill (K, V and queries) and one replayed cache at a time whatever its size:
the batch bounds how long a configuration waits for its folder to be complete, and costs one prefill per
window and batch. The work is planned as units (eval.units: a batch's PPL on one book, its scores on one task
example), run here one after the other or on a Ray cluster (eval.executors); their records are appended in the
plan's order either way, so the files are the same. Speed is measured here, after the units, one batch at a
time. Results are appended as each unit finishes; a rerun skips the configurations whose folder is
complete and the (book, config) pairs and examples already scored, and refuses an OUT written with other
settings, so a folder never mixes two setups.
"""

from __future__ import annotations

import functools
import os
import platform
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import torch
from tqdm import tqdm

from minipythia import Compressor, NoCompression, Prefill
from minipythia.bounded import shown
from minipythia.timing import clock

from .data import Book, describe_books, speed_prompts, tokenize, tokenized_books
from .grid import PPL, ConfigError, Grid, SweepSpec, folder_name
from .executors import Job, ModelSource, RayCluster, run_serial
from .ppl import PPL_RECORD_KEYS, kept_per_head, ppl_base, record_key, warn_uncompressed
from .report import write_report
from .results import append_jsonl, check_no_links_out, locked, read_json, read_jsonl, write_json
from .replay import Future
from .speed import REFERENCE_KEYS, RUN_KEYS, complete_speed_rows, load_hf, measure, measure_hf, run_meta
from .tasks import TASK_RECORD_KEYS, TextSource, example_shape, sample_text, task_complete
from .tasks import record_key as task_record_key
from .units import Unit, Windows

# Settings a folder written before they existed does not record; a sweep that has them may still add to it.
LATER_SETTINGS = ("tasks", "task_text", "device")
# The text tasks cut examples from: each book's first TASK_TEXT_POSITIONS x trained-length tokens, else
# SAMPLED_STREAMS sequences of the trained length sampled from the model.
TASK_TEXT_POSITIONS = 4
SAMPLED_STREAMS = 4


def ppl_complete(folder: Path, base: dict, books: list[str], label: str) -> bool:
    keys = {record_key(r) for r in read_jsonl(folder / "ppl.jsonl", PPL_RECORD_KEYS)}
    return all(record_key(dict(base, book=b, label=label)) in keys for b in books)


def sweep_settings(spec: SweepSpec, tokenized) -> dict:
    """What must be the same for results to share a folder. Settings at their defaults that older folders do
    not record (mode, ppl, speed.hf) are left out, so those folders still match."""
    settings = dict(model=spec.model, revision=spec.revision, dtype=spec.dtype, tokenizer=spec.tokenizer,
                    ctx_len=spec.ctx_len, stride=spec.stride, max_tokens=spec.max_tokens,
                    books=[[name, source, ids.numel()] for name, source, ids in tokenized],
                    speed=asdict(spec.speed) if spec.speed else None)
    if spec.speed and not spec.speed.hf:
        del settings["speed"]["hf"]
    if spec.mode != "window":
        settings.update(mode=spec.mode, decode_interval=spec.decode_interval)
    if not spec.ppl:
        settings["ppl"] = False
    if spec.device != "cpu":  # a GPU's kernels give other last bits: its results are not mixed with a CPU's
        settings["device"] = spec.device.split(":")[0]
    tasks = {t.name: t.settings() for t in spec.tasks}
    if spec.ppl and spec.mode == "window" and spec.short_context is not None:
        tasks = {PPL: dict(short_context=spec.short_context), **tasks}
    if tasks:
        settings["tasks"] = tasks
    return settings


def check_settings(out: Path, settings: dict):
    """Refuses to mix two setups in one OUT: model, data, windows and speed settings must be those of its sweep.json."""
    if (out / "suite.json").is_file() or ((out / "ppl.jsonl").is_file() and not (out / "sweep.json").is_file()):
        raise ConfigError(f"{out} holds results in the older flat layout (ppl.jsonl at its top); `python -m eval "
                          f"report {out}` moves them into the folder layout first")
    path = out / "sweep.json"
    if not path.is_file():
        return
    before = read_json(path).get("settings")
    changed = [k for k in sorted(set(before) | set(settings)) if before.get(k) != settings.get(k)
               and not (k in LATER_SETTINGS and k not in before) and k != "tasks"]
    tasks_before, tasks_now = before.get("tasks") or {}, settings.get("tasks") or {}
    for name in sorted(set(tasks_before) & set(tasks_now)):
        if tasks_before[name] != tasks_now[name]:
            raise ConfigError(f"{out} holds task {name} with other settings ({_brief(tasks_before[name])} there, "
                              f"{_brief(tasks_now[name])} now); give another --out or delete it")
    if changed:
        k = changed[0]
        also = f"; also {', '.join(changed[1:4])}{', ...' if len(changed) > 4 else ''}" if len(changed) > 1 else ""
        raise ConfigError(f"{out} holds a sweep with other settings ({k}: {_brief(before.get(k))} there, "
                          f"{_brief(settings.get(k))} now{also}); give another --out or delete it")


def _brief(value) -> str:
    """A setting's value for a one-line refusal: itself when short, else how many entries it has (a book list)."""
    text = shown(value)
    if len(text) <= 60:
        return "none" if value in ([], None) else text
    return f"{len(value)} entries" if isinstance(value, (list, dict)) else text[:57] + "..."


@torch.inference_mode()
def held_bytes(model, configs: list[Compressor], prompt_len: int) -> dict[str, int]:
    """label -> the bytes each configuration's cache really holds after compressing a prompt_len-token prompt
    (measured on a replay of one prefill of random ids: how many entries a policy keeps, and how it stores
    them, do not depend on the values): the KV budget in bytes, which eviction and quantization share."""
    ids = torch.randint(0, model.config.vocab_size, (1, max(prompt_len, 1) + 8), generator=torch.Generator().manual_seed(0))
    ids = ids.to(model.embed_in.weight.device)
    future = Future(model, Prefill.record(model, ids[:, :-8]), ids[:, -8:])  # the oracle's: 8 more random tokens
    return {c.label: future.replay(c).nbytes for c in configs} | {None: future.replay(None).nbytes}


def merged_settings(out: Path, settings: dict) -> dict:
    """The settings a folder holds after this sweep: its tasks are those it held and those added now."""
    path = out / "sweep.json"
    before = read_json(path).get("settings", {}) if path.is_file() else {}
    tasks = {**(before.get("tasks") or {}), **(settings.get("tasks") or {})}
    return dict(settings, tasks=tasks) if tasks else settings


def task_text_origin(books: list[Book], model) -> str:
    """Where the tasks' text comes from (a sweep setting: examples are cut from it)."""
    trained = model.config.max_position_embeddings
    if books:
        return describe_books(books, TASK_TEXT_POSITIONS * trained)
    return f"{SAMPLED_STREAMS} texts of {trained} tokens sampled from the model (temperature 1, seed 0)"


def task_text(books: list[Book], tokenizer, model) -> TextSource:
    """The text the tasks cut their examples from: the books, else text the model samples (seeded), so that a
    run without data still reports the quality of each configuration."""
    trained = model.config.max_position_embeddings
    origin = task_text_origin(books, model)
    if books:
        return TextSource([(b.name, tokenize(b, tokenizer, TASK_TEXT_POSITIONS * trained)) for b in books],
                          origin, tokenizer)
    print(f"note: no books: the tasks use {origin}", file=sys.stderr)
    return TextSource(sample_text(model, SAMPLED_STREAMS, trained), origin, tokenizer)


def measure_batch(model, prompts: dict, batch: list[Compressor], spec: SweepSpec, meta: dict, run: str,
                  folders: dict[str, Path], checkpoint: Path):
    """Speed of a batch, interleaved with no compression (the reference of every row, from the same run);
    with speed.hf, transformers' generate on the same checkpoint too, its rows beside no compression's."""
    in_batch = any(c.label == "none" for c in batch)
    reference = next((c for c in batch if c.label == "none"), NoCompression())
    configs = [reference] + [c for c in batch if c.label != "none"]
    row_meta = dict(run_meta(meta, spec.speed.new_tokens, spec.speed.repeats), run=run)
    references, none_tokens = {}, {}
    bar = tqdm(total=len(prompts) * len(configs), desc=f"speed ({len(configs)} configs)", unit="row", file=sys.stderr)

    def save(row):
        bar.update(1)
        if row["label"] == "none":  # measure() yields it first at each prompt length
            # with its per-repeat figures: they ran beside the batch's, so ratios pair by repeat
            references[row["prompt_len"]] = {k: row[k] for k in REFERENCE_KEYS + RUN_KEYS}
            none_tokens[row["prompt_len"]] = row["tokens"]
            if not in_batch:
                return
        else:
            row = dict(row, reference=references[row["prompt_len"]])
        append_jsonl(folders[row["label"]] / "speed.jsonl", dict(row_meta, **row))

    measure(model, prompts, configs, spec.speed.new_tokens, spec.speed.repeats, on_result=save)
    bar.close()
    if not (spec.speed.hf and in_batch):
        return
    hf = load_hf(checkpoint, model.embed_in.weight.dtype)
    if hf is None:
        print("note: transformers is not installed; the speed part's transformers comparison is skipped",
              file=sys.stderr)
        return
    measure_hf(hf.to(model.embed_in.weight.device), prompts, spec.speed.new_tokens, spec.speed.repeats,
               on_result=lambda r: append_jsonl(folders["none"] / "speed.jsonl", dict(
                   row_meta, **r, same_tokens=r["tokens"] == none_tokens[r["prompt_len"]])))


@dataclass
class SweepInputs:
    """What a sweep runs on, loaded (eval.pipeline.load_inputs): the spec with its model, revision and windows as
    really used, the books, the model and its tokenizer and checkpoint directory, the grid fitted to the model,
    and why PPL is skipped (None: it is not)."""
    spec: SweepSpec
    books: list[Book]
    model: object
    tokenizer: object
    directory: Path
    grid: Grid
    ppl_skipped: str | None = None


def run_sweep(inputs: SweepInputs, out: Path, command: str, cluster: RayCluster | None = None) -> Path:
    """Runs what is not done yet and writes OUT/report.md. Without books (inputs.ppl_skipped says why), or with
    spec.ppl false, only the speed part runs (on the books' first tokens, when there are books). With a cluster,
    the units run there (eval.executors), the rest here. OUT is locked meanwhile: a second run into it is
    refused."""
    prepare_out(out)
    with locked(out):
        planned = plan_sweep(inputs, out, command)
        job, model = planned.job, inputs.model
        if cluster is None:
            run_serial(job.units, model, job.windows, job.meta, job.write)
        else:
            cluster.run([planned.job])
        return planned.finish(model)


@dataclass
class PlannedSweep:
    """A sweep whose folder is written (config.json files, sweep.json) and whose work is planned: its units
    (`job`: what an executor needs to run them) and `finish(model)`, which measures the speed part with the
    model, records the run and writes the report once the units are done."""
    job: Job
    finish: Callable[[object], Path]


def plan_units(batches: list[list[Compressor]], books: list, tasks: dict, folders: dict[str, Path], base: dict,
               meta: dict, batch_examples: int = 1) -> list[Unit]:
    """The work still to do, as units: per configuration batch, its PPL on each book the batch has not
    all scored, then each task example some of the batch lack (with the labels that lack it)."""
    units = []
    for b, batch in enumerate(batches):
        scored = {c.label: {record_key(r) for r in read_jsonl(folders[c.label] / "ppl.jsonl", PPL_RECORD_KEYS)}
                  for c in batch} if books else {}
        for name, source, ids in books:
            todo = [c for c in batch if record_key(dict(base, book=name, label=c.label)) not in scored[c.label]]
            if todo:
                units.append(Unit(b, todo, book=(name, source, ids)))
        for task, examples in tasks.values():
            done = {c.label: {task_record_key(r) for r in read_jsonl(folders[c.label] / f"{task.name}.jsonl",
                                                                     TASK_RECORD_KEYS)} for c in batch}
            # A unit per example, so that an interrupted run keeps every example it scored; with batch_examples,
            # runs of consecutive examples of one shape that the same configurations lack, scored as one batch.
            run, lacking = [], []  # the examples of the unit being gathered, and the configurations they lack
            for example in examples + [None]:
                todo = [c for c in batch if task_record_key(dict(
                    meta, task=task.name, label=c.label, example=example.key)) not in done[c.label]] if example else []
                if run and (len(run) == batch_examples or example is None or todo != lacking
                            or example_shape(example) != example_shape(run[0])):
                    units.append(Unit(b, lacking, task=task, examples=run))
                    run = []
                if todo:
                    run, lacking = run + [example], todo
    return units


def prepare_out(out: Path):
    """Creates the results folder, or says in one line why it cannot be one (before any work starts)."""
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out} is a file, not a folder; give a folder for the results")
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / f".write-test.{os.getpid()}"
        probe.write_text("")
        probe.unlink()
    except OSError as e:
        raise ValueError(f"cannot write results into {out} ({e.strerror}); give a folder you can write to") from None
    check_no_links_out(out)  # a resumed run writes into what it finds there


def plan_sweep(inputs: SweepInputs, out: Path, command: str) -> PlannedSweep:
    """Everything a sweep does before its units run (OUT locked by the caller); the model plans them (the KV
    each configuration holds, the tasks' examples) and is needed again by finish() only for a speed part."""
    spec, books, model, tokenizer = inputs.spec, inputs.books, inputs.model, inputs.tokenizer
    directory, ppl_skipped = inputs.directory, inputs.ppl_skipped
    started, t0 = time.strftime("%Y-%m-%d %H:%M:%S"), clock(model.embed_in.weight.device)
    tokenized = tokenized_books(books, tokenizer, spec.max_tokens) if spec.ppl else []
    settings = sweep_settings(spec, tokenized)
    if model.float32_prefill:  # a bf16 model multiplying in float32 (minipythia/precision.py): other last bits,
        settings["bf16_products"] = "float32"  # so its results are not mixed with a pure bf16 run's
    if spec.tasks:
        settings["task_text"] = task_text_origin(books, model)
    check_settings(out, settings)
    settings = merged_settings(out, settings)
    window_prompt = spec.ctx_len - spec.stride if spec.mode == "window" else spec.ctx_len
    configs, skipped = inputs.grid.configs, inputs.grid.skipped
    for s in skipped:
        print(f"skipped {s['compressor']} {s['settings']}: {s['reason']}", file=sys.stderr)
    if not configs:
        raise ConfigError(f"{spec.path}: every configuration was skipped ({skipped[0]['reason']})")

    folders = {c.label: out / folder_name(c.label) for c in configs}
    n_layers = model.config.num_hidden_layers
    warn_uncompressed(tokenized, configs, n_layers, spec.ctx_len, spec.stride, spec.mode)
    kv_bytes = held_bytes(model, configs, window_prompt)
    for c in configs:  # written first, so that even an unfinished folder says what it holds
        folders[c.label].mkdir(exist_ok=True)
        write_json(folders[c.label] / "config.json", dict(
            label=c.label, compressor=c.name, settings=c.settings(), window_prompt=window_prompt,
            kept_per_head=kept_per_head(c, n_layers, window_prompt),
            kept_per_layer=[min(c.keep_count(layer, window_prompt), window_prompt) for layer in range(n_layers)],
            kv_bytes=kv_bytes[c.label], sweep=settings,
            # What a cache that masks the entries a head drops, instead of freeing them (kvpress's AdaKV), holds.
            **({"kv_bytes_masked": kv_bytes[None]} if any(map(c.headwise_at, range(n_layers))) else {})))

    summary_path = out / "sweep.json"
    previous = read_json(summary_path) if summary_path.is_file() else {}
    # The folder remembers every configuration it has held, so that a later sweep of other policies into it
    # adds to the report instead of hiding what is there.
    held = {c["label"]: c for c in previous.get("configs", [])}
    held.update({c.label: dict(label=c.label, folder=folders[c.label].name, compressor=c.name, settings=c.settings(),
                               **({"timed": False} if c.sees_future else {}))
                 for c in configs})
    summary = dict(
        settings=settings, config_file=str(spec.path), config_text=spec.text, model=spec.model,
        revision=spec.revision, dtype=spec.dtype, checkpoint=str(directory), parameters=model.num_parameters(),
        architecture=dict(layers=n_layers, heads=model.config.num_attention_heads,
                          hidden=model.config.hidden_size, vocab=model.config.vocab_size,
                          trained_positions=model.config.max_position_embeddings),
        data=describe_books(books, spec.max_tokens) if tokenized else "none (PPL skipped)", ppl_skipped=ppl_skipped,
        machine=f"{platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__} "
                f"({torch.get_num_threads()} threads)" + (f", {torch.cuda.get_device_name(model.embed_in.weight.device)}"
                                                         if model.embed_in.weight.is_cuda else ""),
        configs=list(held.values()), skipped=skipped, runs=previous.get("runs", []))
    write_json(summary_path, summary)

    meta = dict(model=spec.model, revision=spec.revision, dtype=spec.dtype)
    base = ppl_base(meta, spec.mode, spec.ctx_len, spec.stride, spec.max_tokens, spec.decode_interval)
    names = [name for name, _, _ in tokenized] if spec.ppl else []
    lengths = spec.speed.prompt_lengths if spec.speed else []

    def timed(c) -> bool:  # generation has no future to give the oracle: it gets no speed rows
        return bool(lengths) and not c.sees_future

    text = functools.cache(lambda: task_text(books, tokenizer, model))  # sampling it costs: only when needed
    examples = {}  # task name -> its examples, built when a configuration needs them

    def examples_of(task):
        if task.name not in examples:
            examples[task.name] = task.examples(text(), model)
        return examples[task.name]

    def task_path(task, c) -> Path:
        return folders[c.label] / f"{task.name}.jsonl"

    def task_done(task, c) -> bool:
        # (a folder without the task's file is not complete: no need to build the examples to know it)
        return task_path(task, c).is_file() and task_complete(task_path(task, c), task, examples_of(task), meta,
                                                              c.label)

    def complete(c) -> bool:
        return (ppl_complete(folders[c.label], base, names, c.label)
                and (not timed(c) or bool(complete_speed_rows(folders[c.label], lengths)))
                and all(task_done(t, c) for t in spec.tasks))

    pending = [c for c in configs if not complete(c)]
    print(f"sweep: {len(configs)} configuration(s), {len(skipped)} skipped, {len(configs) - len(pending)} already "
          f"complete in {out}; {len(pending)} to run in batches of {spec.batch_size}", file=sys.stderr)
    for task in spec.tasks if pending else []:
        examples_of(task)  # now: a task that cannot run on this model or text says so before any work
    batches = [pending[i : i + spec.batch_size] for i in range(0, len(pending), spec.batch_size)]
    units = plan_units(batches, tokenized if spec.ppl else [],
                       {t.name: (t, examples_of(t)) for t in spec.tasks} if pending else {}, folders, base, meta,
                       spec.batch_windows)
    windows = Windows(base, spec.ctx_len, spec.stride if spec.mode == "window" else None, spec.mode,
                      spec.decode_interval, spec.short_context if spec.mode == "window" else None,
                      spec.batch_windows)

    def write(done):
        for label, name, record in done.records:
            append_jsonl(folders[label] / name, record)
        append_jsonl(out / "units.jsonl", dict(done.log, run=run_id))

    run_id = time.strftime("%Y%m%d-%H%M%S")

    def finish(model) -> Path:
        prompts = prompt_source = None
        if lengths and pending:
            prompts, prompt_source = speed_prompts(lengths, books, tokenizer, model.config.vocab_size)
        for i, batch in enumerate(batches):  # here, on the driver: timings are of this machine, one run at a time
            unmeasured = [c for c in batch if timed(c) and not complete_speed_rows(folders[c.label], lengths)]
            if unmeasured:
                measure_batch(model, prompts, unmeasured, spec, dict(meta, prompt_source=prompt_source),
                              f"{run_id}-b{i}", folders, directory)
        t_end = clock(device)
        # How many examples each task has, so that the report can tell a configuration that has not scored them all.
        summary["task_examples"] = {**previous.get("task_examples", {}), **{k: len(v) for k, v in examples.items()}}
        summary["runs"] = summary["runs"] + [dict(command=command, started=started, wall_seconds=round(t_end - t0, 1),
                                                  configs_run=len(pending))]
        write_json(summary_path, summary)
        path = write_report(out)
        print(f"report: {path} (wall time {t_end - t0:.0f} s)")
        return path

    device = model.embed_in.weight.device
    source = ModelSource(str(Path(directory).resolve()), spec.dtype, spec.device)
    model = None  # what the closures above share: the plan holds no model (finish is given one), so it can go
    return PlannedSweep(Job(units, source, windows, meta, write), finish)
