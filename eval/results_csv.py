"""OUT/results.csv: a sweep's results as one tidy table, for a paper's plots and tables (pandas, R, a spreadsheet).

One row per configuration x metric (x book for PPL per book, x prompt length for speed), with the columns

    model, revision, config, compressor, kept_per_head, kv_bytes, metric, book, prompt_len, value

metric is one of
    ppl               exp(total NLL / total tokens): over the books the configuration finished (book empty), or
                      of one book
    ppl_vs_none       PPL / none's PPL - 1, over the books both finished (book empty)
    retained_ppl      PPL's retained (docs/tasks.md); retained_ppl_key_tokens on the key tokens alone
    retained_TASK     a task's retained (recall, needle, continuation, ...)
    ttft_ms, tpot_ms, kv_end_bytes   speed, at prompt_len (minipythia's rows; medians of the repeats)
These are point estimates, the figures report.md shows; summary.csv beside it has them with their intervals,
from the same records. A scale sweep's OUT/results.csv is its
members' tables, one after the other (the model and revision columns tell them apart).
"""

from __future__ import annotations

import csv
import io
import math
from pathlib import Path

from .ppl import ppl_groups
from .results import read_json, write_text
from .tasks.report import ppl_retained, retained_of, task_names

COLUMNS = ["model", "revision", "config", "compressor", "kept_per_head", "kv_bytes", "metric", "book", "prompt_len",
           "value"]
SPEED_METRICS = ("ttft_ms", "tpot_ms", "kv_end_bytes")


def result_rows(out: Path, results) -> list[dict]:
    """The rows of a sweep folder's results (`results`: eval.report.load_sweep's), in the report's order."""
    sweep = read_json(out / "sweep.json")
    group = ppl_groups(results.ppl)[-1] if results.ppl else []  # the latest setup, as the report's tables
    by_book = {(r["label"], r["book"]): r for r in group}
    rows = []
    for c in results.configs:
        label = c["label"]

        def row(metric, value, book="", prompt_len=""):
            if value is None or (isinstance(value, float) and not math.isfinite(value)):
                return
            rows.append(dict(model=sweep["model"], revision=sweep.get("revision") or "", config=label,
                             compressor=c["compressor"], kept_per_head=c.get("kept") if c.get("kept") is not None
                             else "", kv_bytes=c.get("kv_bytes") if c.get("kv_bytes") is not None else "",
                             metric=metric, book=book, prompt_len=prompt_len, value=value))

        mine = [r for r in group if r["label"] == label]
        if mine:
            row("ppl", math.exp(sum(r["nll_sum"] for r in mine) / sum(r["tokens"] for r in mine)))
            common = [r["book"] for r in mine if ("none", r["book"]) in by_book]
            if label != "none" and common:
                def ppl_of(name):
                    return math.exp(sum(by_book[name, b]["nll_sum"] for b in common) /
                                    sum(by_book[name, b]["tokens"] for b in common))
                row("ppl_vs_none", ppl_of(label) / ppl_of("none") - 1)
            for r in mine:
                row("ppl", math.exp(r["nll_sum"] / r["tokens"]), book=r["book"])
            row("retained_ppl", ppl_retained(mine))
            row("retained_ppl_key_tokens", ppl_retained(mine, key_tokens=True))
        for task in task_names(results.tasks):
            mine_of_task = [r for r in results.tasks if r["label"] == label and r["task"] == task]
            row(f"retained_{task}", retained_of(mine_of_task))
        for r in results.speed:
            if r["engine"] == "minipythia" and r["label"] == label:
                for metric in SPEED_METRICS:
                    row(metric, r.get(metric), prompt_len=r["prompt_len"])
    return rows


def csv_text(rows: list[dict]) -> str:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, COLUMNS, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return buffer.getvalue()


def write_results_csv(out: Path, results) -> Path:
    path = Path(out) / "results.csv"
    write_text(path, csv_text(result_rows(Path(out), results)))
    return path


def write_scale_csv(out: Path, member_folders: list[Path], name: str = "results.csv", columns=COLUMNS) -> Path:
    """OUT/results.csv (or another table of each member, `name` with those columns) of a scale sweep: its
    members' tables, concatenated under one header (the model and revision columns tell them apart)."""
    lines = [",".join(columns)]
    for folder in member_folders:
        if (folder / name).is_file():
            lines += (folder / name).read_text(encoding="utf-8").splitlines()[1:]
    path = Path(out) / name
    write_text(path, "\n".join(lines) + "\n")
    return path

