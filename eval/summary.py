"""OUT/summary.csv: every figure of a sweep with its 95% interval, each configuration against full KV (and,
on request, against a named baseline) as a paired interval of the difference, and the share of the oracle's
headroom a configuration reaches at its budget. The report's tables are made from these rows.

One row per (configuration, metric, prompt length for speed, comparison), with the columns

    model, revision, config, metric, prompt_len, mean, ci_low, ci_high, n,
    vs, diff, diff_low, diff_high, distinguishable, oracle_share

- mean: the figure over all units (the value report.md and results.csv show); ci_low/ci_high its 95% bootstrap
  interval over the n independent units (eval.stats): PPL's windows (books' windows, pooled), a task's examples;
  empty when there are fewer than 2 units, or a resample leaves the figure undefined.
- vs: the configuration compared against (`none`, full KV; or the --baseline), and diff its paired difference,
  over the units both scored, the same draws for both: this - vs, except for `ppl`, where it is this / vs - 1.
  distinguishable: whether the interval of diff excludes 0. Empty for the configuration itself.
- speed (ttft_ms, compress_ms, tpot_ms over the repeats; ttft_ratio and tpot_ratio against the no-compression
  run measured in the same repeats, paired by repeat, vs `none`): the interval is that of the figure itself.
- oracle_share: when the sweep has the oracle at this configuration's budget (the same entries per head and
  bytes held), where this configuration lies between the worst configuration at that budget (0) and the oracle
  (1), for the metrics with a direction (retained_*, ppl, a task's exact and NLL).

metric is one of ppl, retained_ppl, retained_ppl_key_tokens, kl, top1 (PPL's, over the windows); retained_TASK and
TASK.FIELD or TASK.KIND.FIELD (a task's raw metrics, means over its examples); ttft_ms, tpot_ms, ttft_ratio,
tpot_ratio at prompt_len (speed, over the repeats).
"""

from __future__ import annotations

import csv
import io
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from . import stats
from .ppl import ppl_groups
from .results import read_json, write_text
from .speed import speed_estimates
from .tasks.base import TASKS, Task

COLUMNS = ["model", "revision", "config", "metric", "prompt_len", "mean", "ci_low", "ci_high", "n", "vs", "diff",
           "diff_low", "diff_high", "distinguishable", "oracle_share"]

UnitsOf = Callable[[list[dict]], dict[tuple, list[float]]]  # a configuration's records -> unit key -> components


@dataclass(frozen=True)
class Metric:
    name: str
    units: UnitsOf
    figure: stats.Figure
    higher_is_better: bool | None = None  # None: no direction (no oracle share)
    relative: bool = False  # compared as this / vs - 1


def _windows(records: list[dict], compressed: bool) -> list[tuple[tuple, dict]]:
    """(unit key, sums) of each window of each book (each book whole, for records written before windows were
    recorded), the windows through a compressed prompt alone with `compressed`."""
    out = []
    for r in records:
        w = r.get("windows")
        if w is None:
            book = dict(tokens=r["tokens"], nll=r["nll_sum"])
            if "nll_short_sum" in r:
                n = r["compressed_tokens"]
                book.update(compressed_tokens=n, nll_compressed=r["nll_compressed_sum"], nll_full=r["nll_full_sum"],
                            nll_short=r["nll_short_sum"], kl=r["kl"] * n, top1=r["top1"] * n,
                            key_nll=r["key_nll_sum"], key_nll_full=r["key_nll_full_sum"],
                            key_nll_short=r["key_nll_short_sum"])
            out.append(((r["book"],), book))
            continue
        out += [((r["book"], i), {k: v[i] for k, v in w.items()}) for i in range(len(w["tokens"]))]
    return [(key, sums) for key, sums in out if not compressed or sums.get("compressed_tokens")]


def _ppl_metric(name: str, components: Callable[[dict], list[float]], figure: stats.Figure, compressed: bool,
                higher_is_better: bool | None, relative: bool = False) -> Metric:
    return Metric(name, lambda records: {key: components(s) for key, s in _windows(records, compressed)}, figure,
                  higher_is_better, relative)


PPL_METRICS = (
    _ppl_metric("ppl", lambda s: [s["nll"], s["tokens"]], stats.perplexity, False, False, relative=True),
    _ppl_metric("retained_ppl", lambda s: [s["nll_short"] - s["nll_compressed"], s["nll_short"] - s["nll_full"]],
                stats.ratio, True, True),
    _ppl_metric("retained_ppl_key_tokens", lambda s: [s["key_nll_short"] - s["key_nll"],
                                                      s["key_nll_short"] - s["key_nll_full"]], stats.ratio, True, True),
    _ppl_metric("kl", lambda s: [s["kl"], s["compressed_tokens"]], stats.ratio, True, False),
    _ppl_metric("top1", lambda s: [s["top1"], s["compressed_tokens"]], stats.ratio, True, True),
)

# A task's raw metrics whose direction is known, for the oracle share.
HIGHER_IS_BETTER = {"exact": True, "gain": True, "rouge_l": True, "top1": True, "nll": False, "kl": False}


def _example(r: dict) -> tuple:
    return (json.dumps(r["example"], sort_keys=True),)


def retained_metric(task: str) -> Metric:
    """A task's retained, sum(weight * gain) / sum(weight * gain_full) over its examples."""
    return Metric(f"retained_{task}", lambda rs: {_example(r): [r["weight"] * r["gain"], r["weight"] * r["gain_full"]]
                                                 for r in rs}, stats.ratio, True)


def estimate_of(metric: Metric, records: list[dict]) -> stats.Estimate | None:
    """The metric over one configuration's records, with its interval."""
    units = metric.units(records)
    return stats.estimate(np.array(list(units.values())), metric.figure) if units else None


def compared(metric: Metric, records: list[dict], reference: list[dict]) -> stats.Estimate | None:
    """The paired difference of the metric between two configurations' records, over the units both scored."""
    mine, theirs = metric.units(records), metric.units(reference)
    common = [k for k in mine if k in theirs]
    if not common:
        return None
    compare = (lambda x, y: x / y - 1) if metric.relative else np.subtract
    return stats.paired_difference(np.array([mine[k] for k in common]), np.array([theirs[k] for k in common]),
                                   metric.figure, compare=compare)


def raw_metric(task: str, kind: str | None, field: str) -> Metric:
    """The mean of one of a task's raw metrics (a record field) over its examples (of one kind)."""
    def units(records):
        return {_example(r): [float(r[field]), 1.0] for r in records
                if r.get(field) is not None and (kind is None or r.get("kind") == kind)}
    return Metric(".".join(x for x in (task, kind, field) if x), units, stats.ratio, HIGHER_IS_BETTER.get(field))


def task_kinds(task: str, tasks: list[dict]) -> list[str | None]:
    """The kinds of a task's examples in the records ([None] for a task without kinds)."""
    return sorted({r.get("kind") for r in tasks if r["task"] == task and r.get("kind")}) or [None]


def task_metrics(tasks: list[dict]) -> list[tuple[str, Metric]]:
    """(task, metric) of each task in the records: its retained, and its raw metrics per kind."""
    out = []
    for task in dict.fromkeys(r["task"] for r in tasks):
        out.append((task, retained_metric(task)))
        out += [(task, raw_metric(task, kind, field)) for kind in task_kinds(task, tasks)
                for field, _, _ in TASKS.get(task, Task).metrics]
    return out


def _row(estimate: stats.Estimate | None) -> dict:
    if estimate is None:
        return {}
    return dict(mean=estimate.mean, ci_low=estimate.low, ci_high=estimate.high, n=estimate.n)


def summary_rows(out: Path, results, baseline: str | None = None) -> list[dict]:
    """The rows of a sweep folder's summary (`results`: eval.report.load_sweep's), configurations in the report's
    order; with `baseline`, each configuration is also compared against that label."""
    sweep = read_json(out / "sweep.json")
    labels = [c["label"] for c in results.configs]
    if baseline is not None and baseline not in labels:
        raise ValueError(f"--baseline {baseline!r} is not a configuration of this sweep; its labels: "
                         f"{', '.join(labels[:8])}{', ...' if len(labels) > 8 else ''}")
    group = ppl_groups(results.ppl)[-1] if results.ppl else []
    meta = dict(model=sweep["model"], revision=sweep.get("revision") or "")
    sources = [(m, group) for m in PPL_METRICS]
    sources += [(m, [r for r in results.tasks if r["task"] == task]) for task, m in task_metrics(results.tasks)]
    rows = []
    for metric, records in sources:
        of = {label: [r for r in records if r["label"] == label] for label in labels}
        for label in labels:
            mine = estimate_of(metric, of[label])
            if mine is None:
                continue
            base = dict(meta, config=label, metric=metric.name, prompt_len="", **_row(mine))
            against = [x for x in dict.fromkeys(("none", baseline)) if x in of and x != label and metric.units(of[x])]
            for vs in against:
                d = compared(metric, of[label], of[vs])
                rows.append(dict(base, vs=vs, **({} if d is None else dict(
                    diff=d.mean, diff_low=d.low, diff_high=d.high, distinguishable=d.excludes(0)))))
            if not against:  # full KV itself, or a sweep without it
                rows.append(dict(base, vs=""))
        add_oracle_shares(rows, metric, results.configs)
    for r in results.speed:
        if r["engine"] == "minipythia" and r["label"] in labels:
            for name, e in speed_estimates(r).items():
                rows.append(dict(meta, config=r["label"], metric=name, prompt_len=r["prompt_len"], **_row(e),
                                 vs="none" if name.endswith("_ratio") else ""))
    return rows


def add_oracle_shares(rows: list[dict], metric: Metric, configs: list[dict]):
    """oracle_share on the metric's rows of every configuration at a budget where the sweep has the oracle."""
    if metric.higher_is_better is None:
        return
    sign = 1 if metric.higher_is_better else -1
    budget = {c["label"]: (c.get("kept"), c.get("kv_bytes")) for c in configs}
    oracles = {budget[c["label"]]: c["label"] for c in configs if c["compressor"] == "oracle"}
    mine = [r for r in rows if r["metric"] == metric.name]
    means = {r["config"]: r["mean"] for r in mine}
    for at, oracle in oracles.items():
        if oracle not in means:
            continue
        peers = [label for label in means if budget.get(label) == at]
        worst = min(sign * means[label] for label in peers)
        for r in mine:
            if r["config"] in peers:
                r["oracle_share"] = stats.oracle_share(sign * r["mean"], sign * means[oracle], worst)


def csv_text(rows: list[dict]) -> str:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, COLUMNS, lineterminator="\n", restval="")
    writer.writeheader()
    writer.writerows({k: "" if v is None else v for k, v in r.items()} for r in rows)
    return buffer.getvalue()


def write_summary_csv(out: Path, rows: list[dict]) -> Path:
    path = Path(out) / "summary.csv"
    write_text(path, csv_text(rows))
    return path


class Summary:
    """The rows, and their paired differences looked up by (config, metric, vs) for the report's tables."""

    def __init__(self, rows: list[dict]):
        self.rows = rows
        self._by = {(r["config"], r["metric"], r.get("prompt_len", ""), r.get("vs", "")): r for r in rows}

    def difference(self, config: str, metric: str, vs: str, prompt_len="") -> stats.Estimate | None:
        r = self._by.get((config, metric, prompt_len, vs))
        return None if r is None or r.get("diff") is None else \
            stats.Estimate(r["diff"], r.get("diff_low"), r.get("diff_high"), r["n"])
