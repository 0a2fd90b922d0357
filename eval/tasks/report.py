"""The report's task section: `retained` per task per configuration, each task's raw metrics, retained vs KV
budget (a panel per task, PPL beside the others) and the needle heatmaps (depth x context, per configuration).

A configuration's `retained` on a task is sum(weight * gain) / sum(weight * gain_full) over the examples it
has scored (eval.tasks.base): the share of full KV's advantage over the task's control that it keeps.
"""

from __future__ import annotations

from pathlib import Path

from .. import plots
from ..budget import budget_axis, line_name
from ..grid import folder_name
from ..markdown import table
from .base import TASK_RECORD_KEYS, TASKS, Task
from ..results import read_jsonl
from .. import summary

# PPL's raw metrics (PPL is eval.ppl's, not a Task: its records weigh by the tokens of each book).
PPL_METRICS = (("kl", "KL(full‖this) nats/token", "{:.4f}"), ("top1", "top-1 agreement", "{:.3f}"))


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


def task_names(records: list[dict]) -> list[str]:
    return list(dict.fromkeys(r["task"] for r in records))


def retained_rows(configs: list[dict], ppl: list[dict], tasks: list[dict]) -> tuple[list[str], list[list]]:
    """(header, rows) of the retained table: a row per configuration, a column per task, each cell its
    retained with its 95% interval (eval.summary's, over PPL's windows, a task's examples)."""
    names = task_names(tasks)
    has_ppl = any("nll_short_sum" in r for r in ppl)
    has_bytes = all(c.get("kv_bytes") is not None for c in configs)
    header = ["config", "KV kept per head"] + (["KV MiB held"] if has_bytes else []) + \
        (["PPL", "PPL key tokens"] if has_ppl else []) + names
    columns = [(metric, ppl) for metric in (summary.PPL_METRICS[1:3] if has_ppl else ())]
    columns += [(summary.retained_metric(t), [r for r in tasks if r["task"] == t]) for t in names]
    rows = []
    for c in configs:
        row = [c["label"], c.get("kept") or ""] + ([f"{c['kv_bytes'] / 2**20:.3f}"] if has_bytes else [])
        for metric, records in columns:
            estimate = summary.estimate_of(metric, [r for r in records if r["label"] == c["label"]])
            row.append("" if estimate is None else estimate.text(3))
        rows.append(row)
    return header, rows


def task_table(tasks: list[dict], configs: list[dict] | None = None, ppl: list[dict] = ()) -> str:
    """The retained table (markdown), for `python -m eval task` and the report."""
    configs = configs or [dict(label=label) for label in dict.fromkeys(r["label"] for r in tasks)]
    return table(*retained_rows(configs, list(ppl), tasks))


def interval_text(estimate, fmt: str) -> str:
    """An estimate as `fmt` formats its numbers: 'mean [low, high]' (the mean alone without an interval)."""
    if estimate is None:
        return ""
    if not estimate.has_interval:
        return fmt.format(estimate.mean)
    return f"{fmt.format(estimate.mean)} [{fmt.format(estimate.low)}, {fmt.format(estimate.high)}]"


def raw_tables(configs: list[dict], ppl: list[dict], tasks: list[dict]) -> list[str]:
    """A table per task (and kind) of its raw metrics per configuration with their 95% intervals (eval.summary):
    means over examples; for PPL over the tokens predicted through a compressed prompt, resampling windows
    (with the key tokens counted)."""
    out = []
    ppl_metrics = {m.name: m for m in summary.PPL_METRICS}
    groups = [("ppl", PPL_METRICS, [r for r in ppl if "kl" in r])]
    groups += [(t, TASKS.get(t, Task).metrics, [r for r in tasks if r["task"] == t]) for t in task_names(tasks)]
    for name, metrics, records in groups:
        for kind in summary.task_kinds(name, records) if records and name != "ppl" else [None] if records else []:
            rows = []
            for c in configs:
                mine = [r for r in records if r["label"] == c["label"] and (kind is None or r.get("kind") == kind)]
                if not mine:
                    continue
                row = [c["label"], len(mine)]
                for key, _, fmt in metrics:
                    metric = ppl_metrics[key] if name == "ppl" else summary.raw_metric(name, kind, key)
                    row.append(interval_text(summary.estimate_of(metric, mine), fmt))
                if name == "ppl":
                    row.append(sum(r["key_tokens"] for r in mine))
                rows.append(row)
            title = name + (f" ({kind})" if kind else "")
            header = ["config", "books" if name == "ppl" else "examples"] + [t for _, t, _ in metrics]
            out += [f"**{title}**", "", table(header + (["key tokens"] if name == "ppl" else []), rows), ""]
    return out


def budget_panels(configs: list[dict], ppl: list[dict], tasks: list[dict], budget: dict[str, float]
                  ) -> dict[str, list[dict]]:
    """task -> [{policy, kept, retained}] for the retained-vs-budget figure (every configuration but full KV,
    `kept` its budget on the report's axis)."""
    panels: dict[str, list[dict]] = {}
    for c in configs:
        if (c["compressor"] == "none" and c["settings"].get("kv_bits") is None) or budget.get(c["label"]) is None:
            continue
        values = {"PPL": ppl_retained([r for r in ppl if r["label"] == c["label"]])}
        for t in task_names(tasks):
            values[t] = retained_of([r for r in tasks if r["label"] == c["label"] and r["task"] == t])
        for name, value in values.items():
            if value is not None:
                panels.setdefault(name, []).append(dict(policy=line_name(c["compressor"], c["settings"]),
                                                        kept=budget[c["label"]], retained=value))
    return panels


def bytes_panels(configs: list[dict], ppl: list[dict], tasks: list[dict]) -> dict[str, list[dict]]:
    """task (or "PPL") -> [{policy, kv_bytes, retained, low, high}] for the retained-vs-bytes figure: every
    configuration whose bytes held are known but full KV, retained with its 95% interval (eval.summary)."""
    columns = [("PPL", summary.PPL_METRICS[1], ppl)] if any("nll_short_sum" in r for r in ppl) else []
    columns += [(t, summary.retained_metric(t), [r for r in tasks if r["task"] == t]) for t in task_names(tasks)]
    panels: dict[str, list[dict]] = {}
    for c in configs:
        if (c["compressor"] == "none" and c["settings"].get("kv_bits") is None) or c.get("kv_bytes") is None:
            continue
        for name, metric, records in columns:
            e = summary.estimate_of(metric, [r for r in records if r["label"] == c["label"]])
            if e is not None:
                panels.setdefault(name, []).append(dict(policy=line_name(c["compressor"], c["settings"]),
                                                        kv_bytes=c["kv_bytes"], retained=e.mean, low=e.low,
                                                        high=e.high))
    return panels


def heatmap_cells(task: str, tasks: list[dict], configs: list[dict]
                  ) -> dict[str, dict[str, dict[tuple, tuple[float, int]]]]:
    """Per kind of example (one when records have no `kind`): label -> (row, column) -> (value, examples), over
    the two key fields the task names (Task.heatmap). The value is the exact-match rate when full KV gets some
    example of that kind exactly right, else retained (a model that cannot retrieve, as tiny-pg19, still shows
    what compression removes), None where retained is undefined (full KV gains nothing there); examples: how
    many it rests on (few: a cell says little on its own)."""
    rows_key, cols_key = TASKS[task].heatmap
    records = [r for r in tasks if r["task"] == task]
    out: dict[str, dict[str, dict[tuple, tuple[float, int]]]] = {}
    for kind in sorted({r.get("kind", "") for r in records}):
        mine = [r for r in records if r.get("kind", "") == kind]
        exact = any(r.get("exact_full") for r in mine)
        title = f"{task}{' ' + kind if kind else ''} ({'exact match' if exact else 'retained'})"
        for c in configs:
            cells: dict[tuple, list[dict]] = {}
            for r in mine:
                if r["label"] == c["label"]:
                    cells.setdefault((r["example"][rows_key], r["example"][cols_key]), []).append(r)
            out.setdefault(title, {})[c["label"]] = {
                k: (sum(r["exact"] for r in rs) / len(rs) if exact else retained_of(rs), len(rs))
                for k, rs in cells.items()}
    return out


# The heatmaps' axes: the examples' key fields with their units.
HEATMAP_AXES = {"context": "context (tokens)", "depth": "depth (share of context)"}


def task_section(configs: list[dict], ppl: list[dict], tasks: list[dict], out: Path, budget: str = "auto"
                 ) -> list[str]:
    """The report's markdown for the tasks, with its figures written under out/plots."""
    if not tasks and not any("nll_short_sum" in r for r in ppl):
        return []
    about = [("ppl", "the windows' targets through the compressed prompt, against the same targets predicted "
                     "from only their last `short_context` tokens; key tokens: those the long context helps most "
                     "(LongPPL's criterion)")] if any("nll_short_sum" in r for r in ppl) else []
    about += [(t, TASKS[t].about) for t in task_names(tasks) if t in TASKS]
    lines = ["## What compression costs: retained per task", "",
             "`retained` = the share of full KV's advantage over each task's control that a configuration keeps "
             "(1 = as good as full KV, 0 = as if the context were not there; docs/tasks.md).", "",
             *[f"- **{name}**: {text}" for name, text in about], "",
             table(*retained_rows(configs, ppl, tasks)), ""]
    axis = budget_axis(configs, budget)
    panels = budget_panels(configs, ppl, tasks, axis[1]) if axis else {}
    if panels:
        plots.retained_vs_budget(panels, "retained vs KV budget (higher is better; 1 = full KV)",
                                 out / "plots" / "retained_vs_budget.png", axis[0])
        lines += ["![retained vs KV budget](plots/retained_vs_budget.png)", ""]
    by_bytes = bytes_panels(configs, ppl, tasks)
    if by_bytes:
        plots.retained_vs_bytes(by_bytes, "retained vs KV bytes held, with 95% intervals (higher is better)",
                                out / "plots" / "retained_vs_bytes.png")
        lines += ["![retained vs KV bytes held](plots/retained_vs_bytes.png)", "",
                  "At equal bytes held, a policy whose interval bar lies wholly above another's keeps more of what "
                  "full KV gives; overlapping bars are not told apart by this sample (the paired differences below "
                  "are sharper: they remove what the examples share).", ""]
    for task in task_names(tasks):
        if task not in TASKS or TASKS[task].heatmap is None:
            continue
        rows_key, cols_key = TASKS[task].heatmap
        for title, by_label in heatmap_cells(task, tasks, configs).items():
            name = folder_name(title.split(" (")[0].replace(" ", "_") + "_heatmap.png")  # e.g. needle_passkey_...
            plots.heatmaps(by_label, f"{title} by {rows_key} (rows) and {cols_key} (columns)",
                           HEATMAP_AXES.get(rows_key, rows_key), HEATMAP_AXES.get(cols_key, cols_key),
                           out / "plots" / name)
            lines += [f"![{title}](plots/{name})", ""]
    lines += ["### Raw metrics per task", ""] + raw_tables(configs, ppl, tasks)
    return lines
