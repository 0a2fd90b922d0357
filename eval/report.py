"""Markdown tables from ppl.jsonl and speed.jsonl, and the suite's report.md."""

from __future__ import annotations

import json
import math
from pathlib import Path

from .results import read_jsonl

PPL_GROUP = ("model", "revision", "dtype", "ctx_len", "stride", "max_tokens")


def table(header: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(x).replace("|", "\\|") for x in row) + " |" for row in rows]
    return "\n".join(lines)


def _ppl(nll_sum: float, tokens: int) -> float:
    return math.exp(nll_sum / tokens)


def _pct(x: float, ref: float) -> str:
    return f"{100 * (x / ref - 1):+.2f}%"


def _group_title(r: dict) -> str:
    limit = "full books" if r["max_tokens"] is None else f"first {r['max_tokens']} tokens per book"
    revision = f" @ {r['revision']}" if r.get("revision") else ""
    return f"{r['model']}{revision}, {r['dtype']}, ctx_len {r['ctx_len']}, stride {r['stride']}, {limit}"


def ppl_tables(records: list[dict]) -> str:
    """Per group of (model, dtype, windows, truncation): overall PPL per config with its change vs none,
    then PPL per book. Overall PPL = exp(total NLL / total tokens) over the books a config has finished;
    the change vs none is over the books both have."""
    groups: dict[tuple, list[dict]] = {}
    for r in records:
        groups.setdefault(tuple(r.get(k) for k in PPL_GROUP), []).append(r)
    out = []
    for rows in groups.values():
        labels = list(dict.fromkeys(r["label"] for r in rows))
        labels.sort(key=lambda label: label != "none")  # the reference first, then the order they were run
        by = {(r["label"], r["book"]): r for r in rows}
        books = list(dict.fromkeys(r["book"] for r in rows))
        overall = []
        for label in labels:
            mine = [by[label, b] for b in books if (label, b) in by]
            nll, tokens = sum(r["nll_sum"] for r in mine), sum(r["tokens"] for r in mine)
            common = [b for b in books if (label, b) in by and ("none", b) in by]
            if label != "none" and common:
                ref = _ppl(sum(by["none", b]["nll_sum"] for b in common), sum(by["none", b]["tokens"] for b in common))
                mine_common = _ppl(sum(by[label, b]["nll_sum"] for b in common),
                                   sum(by[label, b]["tokens"] for b in common))
                delta = _pct(mine_common, ref)
            else:
                delta = "" if label == "none" else "n/a (no 'none' run)"
            overall.append([label, len(mine), tokens, f"{nll / tokens:.4f}", f"{_ppl(nll, tokens):.3f}", delta])
        out.append(f"**{_group_title(rows[0])}**\n")
        out.append(table(["config", "books", "tokens", "NLL/token", "PPL", "PPL vs none"], overall))
        per_book = [[b, by[labels[0], b]["tokens"] if (labels[0], b) in by else ""] +
                    [f"{by[label, b]['ppl']:.3f}" if (label, b) in by else "" for label in labels] for b in books]
        out.append("\nPPL per book:\n")
        out.append(table(["book", "tokens"] + labels, per_book))
        out.append("")
    return "\n".join(out)


def latest_run(records: list[dict]) -> list[dict]:
    if not records:
        return []
    run = records[-1].get("run")
    return [r for r in records if r.get("run") == run]


def speed_table(records: list[dict]) -> str:
    """One run's rows; ratios are against minipythia without compression at the same prompt length."""
    base = {r["prompt_len"]: r for r in records if r["engine"] == "minipythia" and r["label"] == "none"}

    def ratio(r, key):
        ref = base.get(r["prompt_len"])
        return f"{r[key] / ref[key]:.2f}x" if ref else ""

    def mib(r, key):
        return f"{r[key] / 2**20:.2f}" if r.get(key) is not None else ""

    rows = []
    for r in records:
        ref = base.get(r["prompt_len"])
        name = r["label"] if r["engine"] == "minipythia" else f"transformers generate ({r['label']})"
        kv_change = _pct(r["kv_end_bytes"], ref["kv_end_bytes"]) if ref and r.get("kv_end_bytes") else ""
        compress = f"{r['compress_ms']:.1f}" if "compress_ms" in r else ""
        rows.append([r["prompt_len"], name, f"{r['ttft_ms']:.1f}", ratio(r, "ttft_ms"), compress, f"{r['tpot_ms']:.2f}",
                     ratio(r, "tpot_ms"), f"{r['tok_s']:.1f}", mib(r, "kv_prefill_bytes"),
                     mib(r, "kv_compressed_bytes"), mib(r, "kv_end_bytes"), kv_change, r["peak_rss_mib"]])
    return table(["prompt", "config", "TTFT ms", "TTFT vs none", "compress ms", "TPOT ms", "TPOT vs none", "tok/s",
                  "KV prefill MiB", "KV kept MiB", "KV end MiB", "KV end vs none", "peak RSS MiB"], rows)


def speed_title(r: dict) -> str:
    return (f"{r['model']}, {r['dtype']}, {r['new_tokens']} new tokens, {r['repeats']} repeat(s), prompts: "
            f"{r['prompt_source']}, {r['threads']} torch threads")


SPEED_NOTES = ("TTFT = prefill with last_only + compression + first argmax; compress = time inside "
               "KVCache.compress during that prefill (part of TTFT); TPOT = median decode step after "
               "3 warm-up steps; tok/s = 1000 / TPOT; KV = bytes the cache tensors hold (K, V and positions); "
               "peak RSS = the process's peak resident memory during the run, weights included (reset before "
               "each run on Linux; transformers rows hold both models). transformers: TTFT from a max_new_tokens=1 "
               "generate call, TPOT = median interval between per-token LogitsProcessor calls.")


def write_report(out: str | Path) -> Path:
    """DIR/report.md from DIR/ppl.jsonl, DIR/speed.jsonl and DIR/suite.json (any of them may be missing)."""
    out = Path(out)
    if not out.is_dir():
        raise ValueError(f"results directory {str(out)!r} does not exist")
    ppl, speed = read_jsonl(out / "ppl.jsonl"), read_jsonl(out / "speed.jsonl")
    suite = json.loads((out / "suite.json").read_text()) if (out / "suite.json").is_file() else {}
    if not (ppl or speed or suite):
        raise ValueError(f"{out} holds no ppl.jsonl, speed.jsonl or suite.json to report on")
    lines = ["# KV-cache compression eval", ""]
    if suite:
        lines += [f"- model: `{suite['model']}` ({suite['dtype']}, {suite['parameters'] / 1e6:.1f}M parameters)",
                  f"- data: {suite['data']}",
                  f"- machine: {suite['machine']}",
                  *[f"- run {i + 1}: {r['started']}, wall time {r['wall_seconds']:.0f} s "
                    f"(PPL {r['ppl_seconds']:.0f} s, speed {r['speed_seconds']:.0f} s): `{r.get('command', '')}`"
                    for i, r in enumerate(suite["runs"])],
                  "- reruns resume: they skip the PPL entries and the speed run already in the jsonl files", ""]
    lines += ["## Sliding-window perplexity", ""]
    if ppl:
        lines += [ppl_tables(ppl)]
    else:
        lines += [suite.get("ppl_skipped", "No PPL results."), ""]
    lines += ["## Speed and KV memory", ""]
    run = latest_run(speed)
    if run:
        earlier = len({r.get("run") for r in speed}) - 1
        lines += [f"**{speed_title(run[0])}**" + (f" (latest of {earlier + 1} runs in speed.jsonl)" if earlier else ""),
                  "", speed_table(run), "", SPEED_NOTES, ""]
        hf = [r for r in run if r["engine"] == "transformers"]
        if hf:
            same = all(r.get("same_tokens") for r in hf)
            lines += [f"transformers produced {'the same' if same else 'different'} greedy tokens as minipythia "
                      f"without compression.", ""]
    else:
        lines += ["No speed results.", ""]
    path = out / "report.md"
    path.write_text("\n".join(lines))
    return path
