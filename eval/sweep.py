"""python -m eval sweep CONFIG.yaml: PPL (and, optionally, speed) of every configuration of a grid.

    OUT/sweep.json            settings, the YAML, the configurations, the skipped ones with the reason, each run
    OUT/<label>/config.json   the compressor, its settings, its KV budget, the sweep's settings
    OUT/<label>/ppl.jsonl     one record per book (eval.ppl.run_ppl's)
    OUT/<label>/speed.jsonl   one row per prompt length (eval.speed.measure's), with `reference`: no compression
                              measured in the same run, interleaved with it
    OUT/report.md, OUT/plots/ (eval.report)

Identical tokens: every configuration scores the same books, truncation and windows, and configurations are
scored `batch_size` at a time over one prefill per window (eval.ppl), whose per-token NLLs equal separate runs'.
A batch holds one window's prefill (K, V and queries) and one replayed cache at a time whatever its size:
the batch bounds how long a configuration waits for its folder to be complete, and costs one prefill per
window and batch. Results are appended as each book (PPL) and prompt length (speed) finishes; a rerun skips
the configurations whose folder is complete and the (book, config) pairs already scored, and refuses an OUT
written with other settings, so a folder never mixes two setups.
"""

from __future__ import annotations

import json
import os
import platform
import sys
import time
from dataclasses import asdict
from pathlib import Path

import torch
from tqdm import tqdm

from minipythia import Compressor, NoCompression

from .data import Book, describe_books, speed_prompts, tokenized_books
from .grid import ConfigError, SweepSpec, expand, folder_name
from .ppl import kept_per_head, record_key, run_ppl
from .report import write_report
from .results import append_jsonl, read_jsonl
from .speed import measure, run_meta

# What a speed row keeps of the no-compression row measured with it (the tokens are left out).
REFERENCE_KEYS = ("ttft_ms", "compress_ms", "tpot_ms", "tok_s", "kv_prefill_bytes", "kv_compressed_bytes",
                  "kv_end_bytes", "kept_after_prefill", "peak_rss_mib")


def probe(model, compressor: Compressor, prompt_len: int) -> str | None:
    """Why a compressor cannot run on this model's window prompts (its ValueError, e.g. the oracle without
    future queries), else None: one compression of random K, V and queries of that shape, as a prefill does."""
    if prompt_len < 1:
        return None
    c, p = model.config, model.embed_in.weight
    cache = model.new_cache(1, compressor)
    g = torch.Generator().manual_seed(0)
    for layer in range(c.num_hidden_layers):
        k, v, q = (torch.randn(1, c.num_attention_heads, prompt_len, c.head_size, generator=g).to(p.device, p.dtype)
                   for _ in range(3))
        cache.append(layer, k, v)
        try:
            cache.compress(layer, q)
        except ValueError as e:
            return str(e)
    return None


def ppl_complete(folder: Path, base: dict, books: list[str], label: str) -> bool:
    keys = {record_key(r) for r in read_jsonl(folder / "ppl.jsonl")}
    return all(record_key(dict(base, book=b, label=label)) in keys for b in books)


def complete_speed_rows(folder: Path, lengths: list[int]) -> list[dict]:
    """The rows of the latest run that measured every prompt length (none when there is no such run)."""
    runs: dict[str, list[dict]] = {}
    for r in read_jsonl(folder / "speed.jsonl"):
        runs.setdefault(r["run"], []).append(r)
    complete = [rows for rows in runs.values() if {r["prompt_len"] for r in rows} >= set(lengths)]
    return complete[-1] if complete else []


def check_settings(out: Path, settings: dict):
    """Refuses to mix two setups in one OUT: model, data, windows and speed settings must be those of its sweep.json."""
    if (out / "suite.json").is_file():
        raise ConfigError(f"{out} holds the results of `python -m eval suite` (suite.json); give the sweep "
                          f"another --out")
    path = out / "sweep.json"
    if not path.is_file():
        return
    before = json.loads(path.read_text())["settings"]
    changed = [k for k in sorted(set(before) | set(settings)) if before.get(k) != settings.get(k)]
    if changed:
        k = changed[0]
        raise ConfigError(f"{out} holds a sweep with other settings ({k}: {before.get(k)!r} there, "
                          f"{settings.get(k)!r} now{', and more' if len(changed) > 1 else ''}); give another --out "
                          f"or delete it")


def measure_batch(model, prompts: dict, batch: list[Compressor], spec: SweepSpec, meta: dict, run: str,
                  folders: dict[str, Path]):
    """Speed of a batch, interleaved with no compression (the reference of every row, from the same run)."""
    in_batch = any(c.label == "none" for c in batch)
    reference = next((c for c in batch if c.label == "none"), NoCompression())
    configs = [reference] + [c for c in batch if c.label != "none"]
    row_meta = dict(run_meta(meta, spec.speed.new_tokens, spec.speed.repeats), run=run)
    references = {}
    bar = tqdm(total=len(prompts) * len(configs), desc=f"speed ({len(configs)} configs)", unit="row", file=sys.stderr)

    def save(row):
        bar.update(1)
        if row["label"] == "none":  # measure() yields it first at each prompt length
            references[row["prompt_len"]] = {k: row[k] for k in REFERENCE_KEYS}
            if not in_batch:
                return
        else:
            row = dict(row, reference=references[row["prompt_len"]])
        append_jsonl(folders[row["label"]] / "speed.jsonl", dict(row_meta, **row))

    measure(model, prompts, configs, spec.speed.new_tokens, spec.speed.repeats, on_result=save)
    bar.close()


def run_sweep(spec: SweepSpec, books: list[Book], model, tokenizer, directory: Path, out: Path, command: str,
              ppl_skipped: str | None = None) -> Path:
    """Runs what is not done yet and writes OUT/report.md. spec.model / ctx_len / stride are the resolved ones.
    Without books (ppl_skipped says why) only the speed part runs."""
    started, t0 = time.strftime("%Y-%m-%d %H:%M:%S"), time.perf_counter()
    tokenized = tokenized_books(books, tokenizer, spec.max_tokens)
    settings = dict(model=spec.model, revision=spec.revision, dtype=spec.dtype, tokenizer=spec.tokenizer,
                    ctx_len=spec.ctx_len, stride=spec.stride, max_tokens=spec.max_tokens,
                    books=[[name, source, ids.numel()] for name, source, ids in tokenized],
                    speed=asdict(spec.speed) if spec.speed else None)
    check_settings(out, settings)
    window_prompt = spec.ctx_len - spec.stride
    grid = expand(spec.policies, {"num_layers": model.config.num_hidden_layers})
    configs, skipped = [], list(grid.skipped)
    for c in grid.configs:
        reason = probe(model, c, window_prompt)
        if reason:
            skipped.append(dict(compressor=c.name, settings=c.settings(), reason=reason))
        else:
            configs.append(c)
    for s in skipped:
        print(f"skipped {s['compressor']} {s['settings']}: {s['reason']}", file=sys.stderr)
    if not configs:
        raise ConfigError(f"{spec.path}: every configuration was skipped ({skipped[0]['reason']})")

    out.mkdir(parents=True, exist_ok=True)
    folders = {c.label: out / folder_name(c.label) for c in configs}
    n_layers = model.config.num_hidden_layers
    for c in configs:  # written first, so that even an unfinished folder says what it holds
        folders[c.label].mkdir(exist_ok=True)
        (folders[c.label] / "config.json").write_text(json.dumps(dict(
            label=c.label, compressor=c.name, settings=c.settings(), window_prompt=window_prompt,
            kept_per_head=kept_per_head(c, n_layers, window_prompt),
            kept_per_layer=[min(c.keep_count(layer, window_prompt), window_prompt) for layer in range(n_layers)],
            sweep=settings), indent=2))

    summary_path = out / "sweep.json"
    previous = json.loads(summary_path.read_text()).get("runs", []) if summary_path.is_file() else []
    summary = dict(
        settings=settings, config_file=str(spec.path), config_text=spec.text, model=spec.model,
        revision=spec.revision, dtype=spec.dtype, checkpoint=str(directory), parameters=model.num_parameters(),
        architecture=dict(layers=n_layers, heads=model.config.num_attention_heads,
                          hidden=model.config.hidden_size, vocab=model.config.vocab_size,
                          trained_positions=model.config.max_position_embeddings),
        data=describe_books(books, spec.max_tokens) if books else "none (PPL skipped)", ppl_skipped=ppl_skipped,
        machine=f"{platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__} "
                f"({torch.get_num_threads()} threads)",
        configs=[dict(label=c.label, folder=folders[c.label].name, compressor=c.name, settings=c.settings())
                 for c in configs],
        skipped=skipped, runs=previous)
    summary_path.write_text(json.dumps(summary, indent=2))

    meta = dict(model=spec.model, revision=spec.revision, dtype=spec.dtype)
    base = dict(meta, ctx_len=spec.ctx_len, stride=spec.stride, max_tokens=spec.max_tokens)
    names = [name for name, _, _ in tokenized]
    lengths = spec.speed.prompt_lengths if spec.speed else []

    def complete(c) -> bool:
        return (ppl_complete(folders[c.label], base, names, c.label)
                and (not lengths or bool(complete_speed_rows(folders[c.label], lengths))))

    pending = [c for c in configs if not complete(c)]
    print(f"sweep: {len(configs)} configuration(s), {len(skipped)} skipped, {len(configs) - len(pending)} already "
          f"complete in {out}; {len(pending)} to run in batches of {spec.batch_size}", file=sys.stderr)
    prompts = source = None
    if lengths and pending:
        prompts, source = speed_prompts(lengths, books, tokenizer, model.config.vocab_size)
    run_id = time.strftime("%Y%m%d-%H%M%S")
    bar = tqdm(total=len(configs), initial=len(configs) - len(pending), desc="sweep", unit="config", file=sys.stderr)
    for i in range(0, len(pending), spec.batch_size):
        batch = pending[i : i + spec.batch_size]
        run_ppl(model, tokenized, batch, out, meta, spec.ctx_len, spec.stride, spec.max_tokens,
                path_of=lambda c: folders[c.label] / "ppl.jsonl")
        unmeasured = [c for c in batch if lengths and not complete_speed_rows(folders[c.label], lengths)]
        if unmeasured:
            measure_batch(model, prompts, unmeasured, spec, dict(meta, prompt_source=source),
                          f"{run_id}-b{i // spec.batch_size}", folders)
        bar.update(len(batch))
    bar.close()

    t_end = time.perf_counter()
    summary["runs"] = previous + [dict(command=command, started=started, wall_seconds=round(t_end - t0, 1),
                                       configs_run=len(pending))]
    summary_path.write_text(json.dumps(summary, indent=2))
    path = write_report(out)
    print(f"report: {path} (wall time {t_end - t0:.0f} s)")
    return path
