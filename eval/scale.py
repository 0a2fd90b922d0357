"""Sweeps over models and training checkpoints: `model:` and `revision:` lists in a sweep's YAML.

Every (model, revision) pair is a member: a sweep of its own, in its own folder, OUT/<model>/<revision>/
(a complete results folder: sweep.json, a folder per configuration, report.md), resumable as any sweep.
OUT/scale.json lists the members; OUT/report.md sets them side by side: each configuration's PPL change vs
full KV and its `retained` per task, per member, and plotted against model size (parameters) and against
training step (the number in a revision such as step143000; a member without one, as the default branch, is
left off that axis).
"""

from __future__ import annotations

import re
from pathlib import Path

from minipythia.bounded import shown

from . import plots, summary
from .grid import ConfigError, folder_name
from .markdown import table
from .report import complete_ppl, load_sweep
from .results import check_no_links_out, contained, read_json, write_json, write_text
from .results_csv import write_scale_csv
from .stats import Estimate
from .tasks.report import task_names

MAIN = "main"  # the folder of the default revision


def model_folder(model: str | None) -> str:
    """A local directory by its name, a hub id by its repository name (EleutherAI/pythia-70m -> pythia-70m)."""
    if model is None:
        return "default"
    # A directory by its real name: `ck/sub/..` is `ck`, never the `..` that would leave OUT.
    local = Path(model).expanduser()
    return folder_name(local.resolve().name if local.is_dir() else model.split("/")[-1])


def member_folders(members: list[tuple[str | None, str | None]]) -> dict[tuple, str]:
    """(model, revision) -> its folder under OUT; two models of one folder name are a ConfigError."""
    seen: dict[str, str | None] = {}
    for model, _ in members:
        name = model_folder(model)
        if seen.setdefault(name, model) != model:
            raise ConfigError(f"models {shown(seen[name])} and {shown(model)} would share the results folder {name}/; "
                              f"give one of them a directory of another name")
    folders = {(m, r): f"{model_folder(m)}/{folder_name(r) if r else MAIN}" for m, r in members}
    by_folder: dict[str, tuple] = {}
    for member, folder in folders.items():
        if by_folder.setdefault(folder, member) != member:
            raise ConfigError(f"revisions {shown(by_folder[folder][1])} and {shown(member[1])} would share the results "
                              f"folder {folder}/; rename one")
    return folders


def is_scale_folder(out: Path) -> bool:
    return (out / "scale.json").is_file()


def write_index(out: Path, spec_path: str, spec_text: str, folders: dict[tuple, str]):
    """OUT/scale.json: the members, so that `python -m eval report OUT` finds them."""
    write_json(out / "scale.json", dict(config_file=spec_path, config_text=spec_text, members=[
        dict(model=m, revision=r, folder=f) for (m, r), f in folders.items()]))


def step_of(revision: str | None) -> int | None:
    """The training step a revision names (step1000 -> 1000); None for another name or the default branch
    (Pythia's main is step143000, but a local model's default is anything: give step143000 to place it)."""
    match = re.fullmatch(r"step(\d+)", revision or "")
    return int(match.group(1)) if match else None


def member_metrics(folder: Path) -> tuple[dict, dict[str, dict[str, Estimate | None]]]:
    """A member's facts (model, revision, parameters, finished) and label -> {metric: estimate with its 95%
    interval (eval.summary)}: 'PPL vs none' (relative change, paired, for the configurations that finished every
    book), 'retained: ppl' and 'retained: <task>'."""
    sweep = read_json(folder / "sweep.json")
    results = load_sweep(folder)
    ppl = complete_ppl(results.ppl)
    of = {c["label"]: [r for r in results.ppl if r["label"] == c["label"]] for c in results.configs}
    metrics: dict[str, dict[str, Estimate | None]] = {}
    for c in results.configs:
        label = c["label"]
        mine = {}
        if label in ppl and "none" in ppl:
            mine["PPL vs none"] = summary.compared(summary.PPL_METRICS[0], of[label], of["none"])
        if any("nll_short_sum" in r for r in of[label]):
            mine["retained: ppl"] = summary.estimate_of(summary.PPL_METRICS[1], of[label])
        for task in task_names(results.tasks):
            mine[f"retained: {task}"] = summary.estimate_of(summary.retained_metric(task), [
                r for r in results.tasks if r["label"] == label and r["task"] == task])
        metrics[label] = mine
    facts = dict(model=sweep["model"], revision=sweep.get("revision"), parameters=sweep.get("parameters"),
                 unfinished=any("Unfinished" in s for s in results.sections))
    return facts, metrics


def write_scale_report(out: Path) -> Path:
    """OUT/report.md and OUT/plots/scale_*.png from the members' folders."""
    check_no_links_out(out)
    index = read_json(out / "scale.json")
    members = []
    for m in index["members"]:
        folder = contained(out, m.get("folder"), f"{out / 'scale.json'}: members[].folder")
        if (folder / "sweep.json").is_file():
            facts, metrics = member_metrics(folder)
            members.append(dict(m, **facts, metrics=metrics, name=_member_name(m["model"], m["revision"])))
    lines = ["# KV-cache compression across models and training checkpoints", "",
             f"- {len(index['members'])} member(s) from `{index['config_file']}`, each a sweep in its own folder "
             f"(its report.md has the details)", ""]
    lines += [table(["model", "revision", "parameters", "folder", "state"],
                    [[m["model"], m["revision"] or MAIN, f"{m['parameters'] / 1e6:.2f}M" if m["parameters"] else "",
                      f"[{m['folder']}]({m['folder']}/report.md)", "unfinished" if m["unfinished"] else "complete"]
                     for m in members]), ""]
    labels = list(dict.fromkeys(label for m in members for label in m["metrics"]))
    names = list(dict.fromkeys(k for m in members for v in m["metrics"].values() for k in v))
    for metric in names:
        fmt = (lambda x: f"{100 * x:+.2f}%") if metric == "PPL vs none" else (lambda x: f"{x:.3f}")
        lines += [f"## {metric}", "", table(["config"] + [m["name"] for m in members], [
            [label] + [_cell(m["metrics"].get(label, {}).get(metric), fmt) for m in members] for label in labels]), ""]
        lines += _plots(out, metric, members, [label for label in labels if label != "none"])
    path = out / "report.md"
    write_text(path, "\n".join(lines))
    folders = [out / m["folder"] for m in index["members"]]
    write_scale_csv(out, folders)
    write_scale_csv(out, folders, "summary.csv", summary.COLUMNS)
    return path


def _member_name(model: str | None, revision: str | None) -> str:
    return f"{model_folder(model)}@{revision or MAIN}"


def _cell(value: Estimate | None, fmt) -> str:
    """An estimate as fmt writes each number, 'mean [low, high]'."""
    if value is None:
        return ""
    return fmt(value.mean) + (f" [{fmt(value.low)}, {fmt(value.high)}]" if value.has_interval else "")


def _plots(out: Path, metric: str, members: list[dict], labels: list[str]) -> list[str]:
    """The metric vs model size (one panel per revision) and vs training step (one panel per model), a line
    per configuration; only where the axis has at least two points."""
    lines = []
    slug = folder_name(metric.replace(": ", "_").replace(" ", "_"))
    for axis, x_label in (("size", "parameters"), ("step", "training step")):
        panels: dict[str, dict[str, list[tuple[float, float]]]] = {}
        for m in members:
            x = m["parameters"] if axis == "size" else step_of(m["revision"])
            if x is None:
                continue
            panel = str(m["revision"] or MAIN) if axis == "size" else model_folder(m["model"])
            for label in labels:
                y = m["metrics"].get(label, {}).get(metric)
                if y is not None:
                    panels.setdefault(panel, {}).setdefault(label, []).append((x, y.mean))
        panels = {p: lines_ for p, lines_ in panels.items() if any(len({x for x, _ in v}) > 1 for v in lines_.values())}
        if panels:
            path = plots.quality_vs_scale(panels, metric, x_label, axis == "size",
                                          out / "plots" / f"scale_{axis}_{slug}.png")
            lines += [f"![{metric} vs {x_label}](plots/{path.name})", ""]
    return lines
