"""The report's task section: `retained` per task per configuration, each task's raw metrics, retained vs KV
budget (a panel per task, PPL beside the others) and the needle heatmaps (depth x context, per configuration).

A configuration's `retained` on a task is sum(weight * gain) / sum(weight * gain_full) over the examples it
has scored (eval.tasks.base): the share of full KV's advantage over the task's control that it keeps.
"""

from __future__ import annotations

from pathlib import Path

from .. import plots
from ..markdown import table
from .base import TASK_RECORD_KEYS
from ..results import read_jsonl

# Raw metrics shown per task: (record field, column title, format); means over the examples.
RAW_METRICS = {
    "ppl": [("kl", "KL(full‖this) nats/token", "{:.4f}"), ("top1", "top-1 agreement", "{:.3f}"),
            ("key_tokens", "key tokens", "{:.0f}")],
    "recall": [("gain_full", "full KV gain (nats/token)", "{:.3f}"), ("gain", "gain", "{:.3f}"),
               ("exact", "exact", "{:.2f}")],
    "needle": [("nll_full", "answer NLL, full KV", "{:.3f}"), ("nll", "answer NLL", "{:.3f}"),
               ("exact_full", "exact, full KV", "{:.2f}"), ("exact", "exact", "{:.2f}")],
    "continuation": [("kl", "KL(full‖this) nats/token", "{:.4f}"), ("top1", "top-1 agreement", "{:.3f}"),
                     ("agree_tokens", "greedy tokens before divergence", "{:.1f}"), ("rouge_l", "ROUGE-L F", "{:.3f}")],
}


def read_task_records(folder: Path, label: str) -> list[dict]:
    """Every task record of a configuration's folder (its <task>.jsonl files; ppl.jsonl is PPL's own)."""
    records = []
    for path in sorted(folder.glob("*.jsonl")):
        if path.stem not in ("ppl", "speed"):
            records += [r for r in read_jsonl(path, TASK_RECORD_KEYS) if r["label"] == label]
    return records


def retained_of(records: list[dict]) -> float | None:
    """sum(weight * gain) / sum(weight * gain_full); None when full KV has no advantage to keep."""
    full = sum(r["weight"] * r["gain_full"] for r in records)
    return sum(r["weight"] * r["gain"] for r in records) / full if full > 1e-9 else None


def ppl_retained(records: list[dict], key_tokens: bool = False) -> float | None:
    """PPL's retained over its books, from the summed NLLs (on the key tokens alone with key_tokens)."""
    rows = [r for r in records if "nll_short_sum" in r]
    if not rows:
        return None
    this, full, short = ("key_nll_sum", "key_nll_full_sum", "key_nll_short_sum") if key_tokens else (
        "nll_compressed_sum", "nll_full_sum", "nll_short_sum")
    gain_full = sum(r[short] - r[full] for r in rows)
    return sum(r[short] - r[this] for r in rows) / gain_full if gain_full > 1e-9 else None


def _fmt(x) -> str:
    return "" if x is None else f"{x:.3f}"


def task_names(records: list[dict]) -> list[str]:
    return list(dict.fromkeys(r["task"] for r in records))


def retained_rows(configs: list[dict], ppl: list[dict], tasks: list[dict]) -> tuple[list[str], list[list]]:
    """(header, rows) of the retained table: a row per configuration, a column per task."""
    names = task_names(tasks)
    has_ppl = any("nll_short_sum" in r for r in ppl)
    header = ["config", "KV kept"] + (["PPL", "PPL key tokens"] if has_ppl else []) + names
    rows = []
    for c in configs:
        mine = [r for r in ppl if r["label"] == c["label"]]
        row = [c["label"], c.get("kept") or ""]
        if has_ppl:
            row += [_fmt(ppl_retained(mine)), _fmt(ppl_retained(mine, key_tokens=True))]
        row += [_fmt(retained_of([r for r in tasks if r["label"] == c["label"] and r["task"] == t])) for t in names]
        rows.append(row)
    return header, rows


def task_table(tasks: list[dict], configs: list[dict] | None = None, ppl: list[dict] = ()) -> str:
    """The retained table (markdown), for `python -m eval task` and the report."""
    configs = configs or [dict(label=label) for label in dict.fromkeys(r["label"] for r in tasks)]
    return table(*retained_rows(configs, list(ppl), tasks))


def raw_tables(configs: list[dict], ppl: list[dict], tasks: list[dict]) -> list[str]:
    """A table per task of its raw metrics per configuration (means over examples; PPL: token-weighted)."""
    out = []
    groups = [("ppl", [r for r in ppl if "kl" in r])] + [(t, [r for r in tasks if r["task"] == t])
                                                         for t in task_names(tasks)]
    for name, records in groups:
        if not records:
            continue
        metrics = RAW_METRICS.get(name, [("gain_full", "full KV gain", "{:.3f}"), ("gain", "gain", "{:.3f}")])
        kinds = sorted({r.get("kind") for r in records if r.get("kind")}) or [None]
        for kind in kinds:
            rows = []
            for c in configs:
                mine = [r for r in records if r["label"] == c["label"] and (kind is None or r.get("kind") == kind)]
                if not mine:
                    continue
                weights = [r.get("compressed_tokens", 1) if name == "ppl" else 1 for r in mine]
                row = [c["label"], len(mine)]
                for key, _, fmt in metrics:
                    values = [(float(r[key]), w) for r, w in zip(mine, weights) if r.get(key) is not None]
                    total = sum(w for _, w in values)
                    row.append(fmt.format(sum(v * w for v, w in values) / total) if total else "")
                rows.append(row)
            title = name + (f" ({kind})" if kind else "")
            out += [f"**{title}**", "", table(["config", "books" if name == "ppl" else "examples"] +
                                              [title_ for _, title_, _ in metrics], rows), ""]
    return out


def budget_panels(configs: list[dict], ppl: list[dict], tasks: list[dict]) -> dict[str, list[dict]]:
    """task -> [{policy, kept, retained}] for the retained-vs-budget figure (configurations other than none)."""
    panels: dict[str, list[dict]] = {}
    for c in configs:
        if c["compressor"] == "none" or c.get("kept") is None:
            continue
        values = {"PPL": ppl_retained([r for r in ppl if r["label"] == c["label"]])}
        for t in task_names(tasks):
            values[t] = retained_of([r for r in tasks if r["label"] == c["label"] and r["task"] == t])
        for name, value in values.items():
            if value is not None:
                panels.setdefault(name, []).append(dict(policy=c["compressor"], kept=c["kept"], retained=value))
    return panels


def needle_cells(tasks: list[dict], configs: list[dict]) -> dict[str, dict[str, dict[tuple, float]]]:
    """kind -> label -> (depth, context) -> value: the exact-match rate when full KV finds some needle of that
    kind, else retained (a model that cannot retrieve, as tiny-pg19, still shows what compression removes)."""
    needle = [r for r in tasks if r["task"] == "needle"]
    out: dict[str, dict[str, dict[tuple, float]]] = {}
    for kind in sorted({r["kind"] for r in needle}):
        mine = [r for r in needle if r["kind"] == kind]
        exact = any(r["exact_full"] for r in mine)
        for c in configs:
            cells: dict[tuple, list[dict]] = {}
            for r in mine:
                if r["label"] == c["label"]:
                    cells.setdefault((r["example"]["depth"], r["example"]["context"]), []).append(r)
            values = {k: (sum(r["exact"] for r in rs) / len(rs) if exact else retained_of(rs))
                      for k, rs in cells.items()}
            out.setdefault(f"{kind} ({'exact match' if exact else 'retained'})", {})[c["label"]] = values
    return out


def task_section(configs: list[dict], ppl: list[dict], tasks: list[dict], out: Path) -> list[str]:
    """The report's markdown for the tasks, with its figures written under out/plots."""
    if not tasks and not any("nll_short_sum" in r for r in ppl):
        return []
    lines = ["## What compression costs: retained per task", "",
             "`retained` = the share of full KV's advantage over each task's control that a configuration keeps "
             "(1 = as good as full KV, 0 = as if the context were not there). PPL: over the tokens predicted "
             "through a compressed prompt, against the same targets predicted from only the last `short_context` "
             "tokens; key tokens: those the long context helps most (LongPPL's criterion). recall: a passage "
             "seen in the haystack, cued at the end, vs a haystack without it. needle: the answer to a passkey or "
             "key-value question vs a haystack without the needle. continuation: full KV's greedy continuation vs "
             "a short prompt.", "",
             table(*retained_rows(configs, ppl, tasks)), ""]
    panels = budget_panels(configs, ppl, tasks)
    if panels:
        plots.retained_vs_budget(panels, "retained vs KV budget (higher is better; 1 = full KV)",
                                 out / "plots" / "retained_vs_budget.png")
        lines += ["![retained vs KV budget](plots/retained_vs_budget.png)", ""]
    cells = needle_cells(tasks, [c for c in configs])
    for i, (kind, by_label) in enumerate(cells.items()):
        name = f"needle_{i}.png"
        plots.needle_heatmaps(by_label, f"needle: {kind} by depth and context length", out / "plots" / name)
        lines += [f"![needle {kind}](plots/{name})", ""]
    lines += ["### Raw metrics per task", ""] + raw_tables(configs, ppl, tasks)
    return lines
