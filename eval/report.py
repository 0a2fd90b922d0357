"""report.md, with tables and PNG plots, from a results folder (DIR/sweep.json and a folder per
configuration, as `sweep`, `ppl` and `speed` write it; the flat files of older runs are moved into that
layout first): PPL tables, PPL vs KV budget, speed and memory, compression overhead, the seed study's claims.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

from . import plots
from .claims import claims_section
from .data import book_origin
from .budget import budget_axis, line_name
from .grid import distance_from_defaults, folder_name
from .markdown import table
from .ppl import PPL_RECORD_KEYS, compressed_nothing, ppl_groups
from .results import append_jsonl, check_no_links_out, contained, read_json, read_jsonl, write_json, write_text
from .results_csv import write_results_csv
from .summary import PPL_METRICS, Summary, compared, estimate_of, summary_rows, write_summary_csv
from .tasks.report import read_task_records, task_section, task_table  # noqa: F401  (task_table: for the CLI)
from .speed import REFERENCE_KEYS, SPEED_ROW_KEYS, complete_speed_rows, speed_estimates



PPL = PPL_METRICS[0]


def _ppl(nll_sum: float, tokens: int) -> float:
    return math.exp(nll_sum / tokens)


def _pct(x: float, ref: float) -> str:
    return f"{100 * (x / ref - 1):+.2f}%"


# What the intervals and marks of the tables mean (eval.stats, eval.summary).
INTERVALS = ("[95% CI]: a seeded bootstrap over the independent units (PPL: the books' windows; a task: its examples). "
             "A change vs full KV is paired (the same windows or examples resampled for both); **bold**: its "
             "interval excludes 0, a difference the sample can tell from none; otherwise it cannot.")


def difference_text(d, percent: bool = False) -> str:
    """A paired difference with its interval, bold when the interval excludes 0."""
    if d is None:
        return ""
    text = d.text(2, 100, signed=True, unit="%") if percent else d.text(3, signed=True)
    return f"**{text}**" if d.excludes(0) else text


def _group_title(r: dict) -> str:
    limit = "full books" if r["max_tokens"] is None else f"first {r['max_tokens']} tokens per book"
    revision = f" @ {r['revision']}" if r.get("revision") else ""
    return f"{r['model']}{revision}, {r['dtype']}, ctx_len {r['ctx_len']}, stride {r['stride']}, {limit}"


def _kept(r: dict) -> str:
    if r.get("kept_per_head") is None:
        return ""
    return f"{r['kept_per_head']:g} of {r['window_prompt']}"


def ppl_tables(records: list[dict], per_book: bool = True) -> str:
    """Per group of (model, dtype, windows, truncation): overall PPL per config with its change vs none,
    then PPL per book. Overall PPL = exp(total NLL / total tokens) over the books a config has finished;
    the change vs none is over the books both have. KV kept = entries per head a config leaves of a
    window's prompt (mean over layers)."""
    out = []
    for rows in ppl_groups(records):
        labels = list(dict.fromkeys(r["label"] for r in rows))
        labels.sort(key=lambda label: label != "none")  # the reference first, then the order they were run
        by = {(r["label"], r["book"]): r for r in rows}
        books = list(dict.fromkeys(r["book"] for r in rows))
        overall = []
        for label in labels:
            mine = [by[label, b] for b in books if (label, b) in by]
            nll, tokens = sum(r["nll_sum"] for r in mine), sum(r["tokens"] for r in mine)
            ppl = estimate_of(PPL, mine)
            common = [b for b in books if (label, b) in by and ("none", b) in by]
            if label != "none" and common:
                change = compared(PPL, [by[label, b] for b in common], [by["none", b] for b in common])
                delta = difference_text(change, percent=True)
                why = {compressed_nothing(by[label, b]) for b in common}
                if None not in why:  # not a measured 0: nothing was compressed
                    delta = f"{delta} (no compression: {', '.join(sorted(why))})"
            else:
                delta = "" if label == "none" else "n/a (no 'none' run)"
            overall.append([label, len(mine), tokens, f"{nll / tokens:.4f}", ppl.text(3), ppl.n, delta,
                            _kept(mine[0])])
        out.append(f"**{_group_title(rows[0])}**\n")
        out.append(table(["config", "books", "tokens", "NLL/token", "PPL [95% CI]", "windows", "PPL vs none [95% CI]",
                          "KV kept per head"], overall))
        out.append(f"{INTERVALS}\n")
        if per_book:
            per_book_rows = [[b, by[labels[0], b]["tokens"] if (labels[0], b) in by else ""] +
                             [f"{by[label, b]['ppl']:.3f}" if (label, b) in by else "" for label in labels]
                             for b in books]
            out.append("\nPPL per book:\n")
            out.append(table(["book", "tokens"] + labels, per_book_rows))
        out.append("")
    return "\n".join(out)


def _ratio_text(ratio: float, interval) -> str:
    """'1.02x [0.95, 1.10] ~1' (~1: the interval includes 1, so the configuration is not measurably faster nor
    slower than none), '0.62x [0.58, 0.66]', or '0.62x' without an interval (older runs, a single repeat)."""
    if interval is None or not interval.has_interval:
        return f"{ratio:.2f}x"
    return f"{interval.mean:.2f}x [{interval.low:.2f}, {interval.high:.2f}]" + ("" if interval.excludes(1.0) else " ~1")


def speed_table(records: list[dict]) -> str:
    """Speed rows; ratios are against minipythia without compression at the same prompt length, measured in
    the same run: a row's `reference` when it has one (sweeps), else the run's own `none` row. Times are means
    over the repeats with their 95% interval (eval.speed.speed_estimates), when the row kept its repeats; a ratio
    has an interval only against a reference measured in the same repeats (paired)."""
    base = {r["prompt_len"]: r for r in records if r["engine"] == "minipythia" and r["label"] == "none"}

    def reference(r):
        return r.get("reference") or base.get(r["prompt_len"])

    def ratio(r, key, estimates):
        ref = reference(r)
        return _ratio_text(r[key] / ref[key], estimates.get(key.replace("_ms", "_ratio"))) if ref else ""

    def time(r, key, digits, estimates):
        return estimates[key].text(digits) if key in estimates else f"{r[key]:.{digits}f}"

    def mib(r, key):
        return f"{r[key] / 2**20:.2f}" if r.get(key) is not None else ""

    rows = []
    for r in records:
        ref = reference(r)
        estimates = speed_estimates(r)
        name = r["label"] if r["engine"] == "minipythia" else f"transformers generate ({r['label']})"
        kv_change = _pct(r["kv_end_bytes"], ref["kv_end_bytes"]) if ref and r.get("kv_end_bytes") else ""
        compress = f"{r['compress_ms']:.1f}" if "compress_ms" in r else ""
        share = f"{100 * r['compress_ms'] / r['ttft_ms']:.1f}%" if "compress_ms" in r else ""
        rows.append([r["prompt_len"], name, time(r, "ttft_ms", 1, estimates), ratio(r, "ttft_ms", estimates),
                     compress, share, time(r, "tpot_ms", 2, estimates), ratio(r, "tpot_ms", estimates),
                     f"{r['tok_s']:.1f}", mib(r, "kv_prefill_bytes"), mib(r, "kv_compressed_bytes"),
                     mib(r, "kv_end_bytes"), kv_change, r["peak_rss_mib"]])
    return table(["prompt", "config", "TTFT ms", "TTFT vs none", "compress ms", "compress % of TTFT", "TPOT ms",
                  "TPOT vs none", "tok/s", "KV prefill MiB", "KV kept MiB", "KV end MiB", "KV end vs none",
                  "peak RSS MiB"], rows)


def speed_title(r: dict) -> str:
    return (f"{r['model']}, {r['dtype']}, {r['new_tokens']} new tokens, {r['repeats']} repeat(s), prompts: "
            f"{r['prompt_source']}, {r['threads']} torch threads")


SPEED_NOTES = ("Protocol: at each prompt length every configuration first runs once unmeasured (warm-up), then "
               "each repeat runs every configuration once, interleaved, the first one rotating. "
               "TTFT = prefill with last_only + compression + first argmax; compress = time inside "
               "KVCache.compress during that prefill (part of TTFT); TPOT = per repeat, the median decode step "
               "after 3 warm-up steps; TTFT, compress and TPOT are means over the repeats, with their 95% "
               "bootstrap interval over repeats in brackets when the run kept each repeat's figures; tok/s = "
               "1000 / TPOT. `vs none` = this configuration's mean / no compression's, measured in the same "
               "repeats, with a paired 95% interval (the same repeats resampled on both sides); **~1**: the "
               "interval includes 1, so the difference from no compression is within the machine's noise. "
               "KV = bytes the cache tensors hold (K, V and positions); "
               "peak RSS = the process's peak resident memory during the run, weights included (reset before "
               "each run on Linux; transformers rows hold both models). transformers: TTFT from a max_new_tokens=1 "
               "generate call, TPOT = median interval between per-token LogitsProcessor calls; its ratios are "
               "unpaired (measured after minipythia's repeats), so they carry no interval.")


@dataclass
class Results:
    """What a report is written from, whichever command produced it."""
    title: str
    header: list[str]  # markdown lines naming the model, data, machine and runs
    model: str
    ppl: list[dict]  # eval.ppl.book_records' records
    speed: list[dict]  # speed rows; compressed ones carry `reference` (none, measured in the same run)
    speed_heading: str
    configs: list[dict]  # {label, compressor, settings, kept} in run order (kept: entries per head, when known)
    ppl_missing: str = "No PPL results."
    per_book: bool = True
    lm_head: str | None = None  # "vocab x hidden", when known
    sections: list[str] = field(default_factory=list)  # extra markdown after the header (sweeps: skipped configs)
    tasks: list[dict] = field(default_factory=list)  # eval.tasks records of every configuration


def migrate_flat_layout(out: Path) -> bool:
    """Results of the older `ppl`, `speed` and `suite` commands, every record in OUT/ppl.jsonl and
    OUT/speed.jsonl, moved into the folder layout everything reads now (OUT/sweep.json, OUT/<label>/...).
    The old files are renamed *.flat, so nothing is lost. Returns whether there was anything to move."""
    ppl, speed = read_jsonl(out / "ppl.jsonl", PPL_RECORD_KEYS), read_jsonl(out / "speed.jsonl", SPEED_ROW_KEYS)
    if (out / "sweep.json").is_file() or not (ppl or speed):
        return False
    suite = read_json(out / "suite.json") if (out / "suite.json").is_file() else {}
    configs = {}
    for r in ppl + speed:
        if r.get("engine", "minipythia") == "minipythia":
            configs.setdefault(r["label"], dict(label=r["label"], folder=folder_name(r["label"]),
                                                compressor=r["compressor"], settings=r["settings"]))
    for r in ppl:
        append_jsonl(out / configs[r["label"]]["folder"] / "ppl.jsonl", r)
    none_rows = {(r["run"], r["prompt_len"]): r for r in speed if r["engine"] == "minipythia" and r["label"] == "none"}
    for r in speed:
        ref = none_rows.get((r["run"], r["prompt_len"]))
        if r["engine"] == "minipythia" and r["label"] != "none" and ref is not None:
            r = dict(r, reference={k: ref[k] for k in REFERENCE_KEYS})
        folder = configs[r["label"]]["folder"] if r["engine"] == "minipythia" else folder_name("none")
        append_jsonl(out / folder / "speed.jsonl", r)
    first = (ppl or speed)[0]
    books = {r["book"]: [r["book"], r["source"], r.get("book_tokens")] for r in ppl}
    lengths = sorted({r["prompt_len"] for r in speed})
    settings = dict(model=first["model"], revision=first.get("revision"), dtype=first["dtype"], tokenizer=None,
                    ctx_len=ppl[0]["ctx_len"] if ppl else None, stride=ppl[0]["stride"] if ppl else None,
                    max_tokens=ppl[0]["max_tokens"] if ppl else None, books=list(books.values()),
                    speed=dict(prompt_lengths=lengths, new_tokens=speed[0]["new_tokens"],
                               repeats=speed[0]["repeats"]) if speed else None)
    runs = [dict(command=r.get("command", ""), started=r["started"], wall_seconds=r["wall_seconds"],
                 configs_run=len(configs)) for r in suite.get("runs", [])]
    write_json(out / "sweep.json", dict(
        settings=settings, config_file="(moved from the flat layout of an older run)", config_text="",
        model=first["model"], revision=first.get("revision"), dtype=first["dtype"], checkpoint="?",
        parameters=suite.get("parameters"), architecture=None, data=suite.get("data", f"{len(books)} book(s)"),
        ppl_skipped=suite.get("ppl_skipped"), machine=suite.get("machine", "?"), configs=list(configs.values()),
        skipped=[], runs=runs))
    for name in ("ppl.jsonl", "speed.jsonl", "suite.json"):
        if (out / name).is_file():
            (out / name).rename(out / f"{name}.flat")
    return True


def load_sweep(out: Path) -> Results:
    sweep = read_json(out / "sweep.json")
    s, arch = sweep["settings"], sweep.get("architecture")
    lengths = s["speed"]["prompt_lengths"] if s["speed"] else []
    ppl, speed, unfinished, tasks, kept = [], [], [], [], {}
    books = [name for name, _, _ in s["books"]]
    for i, c in enumerate(sweep["configs"]):
        folder = contained(out, c.get("folder"), f"{out / 'sweep.json'}: configs[{i}].folder")
        records = [r for r in read_jsonl(folder / "ppl.jsonl", PPL_RECORD_KEYS) if r["label"] == c["label"]]
        ppl += records
        tasks += read_task_records(folder, c["label"])
        if (folder / "config.json").is_file():
            kept[c["label"]] = read_json(folder / "config.json")
        complete = complete_speed_rows(folder, lengths) if lengths else []
        speed += complete
        missing = [f"PPL of {len(books) - len({r['book'] for r in records})} of {len(books)} books"] \
            if {r["book"] for r in records} < set(books) else []
        missing += ["speed"] if lengths and not complete and c.get("timed", True) else []
        for task, n in sweep.get("task_examples", {}).items():
            done = len({json.dumps(r["example"], sort_keys=True) for r in tasks if r["label"] == c["label"]
                        and r["task"] == task})
            missing += [f"{task}: {n - done} of {n} examples"] if done < n else []
        if missing:
            unfinished.append([c["label"], ", ".join(missing)])
    speed.sort(key=lambda r: r["prompt_len"])  # stable: configurations keep their order at each length
    order = [t for t in s.get("tasks") or {} if t != "ppl"]  # the tasks in the order the sweep lists them
    tasks.sort(key=lambda r: order.index(r["task"]) if r["task"] in order else len(order))
    shape = (f"{sweep['parameters'] / 1e6:.1f}M parameters: {arch['layers']} layers, hidden {arch['hidden']}, "
             f"{arch['heads']} heads, vocabulary {arch['vocab']}, trained on {arch['trained_positions']} positions"
             if arch else "shape not recorded")
    if s.get("mode") == "stream":
        windows = (f"- PPL: token by token, compressing during decoding every {s['decode_interval']} entries above "
                   f"the budget, restarting every {s['ctx_len']} tokens")
    elif books:
        windows = (f"- PPL windows: ctx_len {s['ctx_len']}, stride {s['stride']}: each window after the first "
                   f"compresses a {s['ctx_len'] - s['stride']}-token prompt and scores {s['stride']} tokens")
    else:
        windows = "- PPL: none"
    header = [f"- model: `{sweep['model']}`" + (f" @ {sweep['revision']}" if sweep.get("revision") else "") +
              f" ({sweep['dtype']}, {shape}), from `{sweep['checkpoint']}`",
              f"- data: {sweep['data']}",
              windows,
              f"- configurations: {len(sweep['configs'])} from `{sweep['config_file']}`, {len(sweep['skipped'])} "
              f"skipped, {len(unfinished)} unfinished",
              f"- machine: {sweep['machine']}",
              *[f"- run {i + 1}: {r['started']}, wall time {r['wall_seconds']:.0f} s, {r['configs_run']} "
                f"configuration(s) run: `{r['command']}`" for i, r in enumerate(sweep["runs"])],
              "- reruns resume: a configuration whose folder holds complete results is skipped", "",
              "<details><summary>sweep configuration</summary>", "", "```yaml", sweep["config_text"].rstrip(), "```",
              "", "</details>", ""]
    sections = []
    if sweep["skipped"]:
        sections += ["## Skipped configurations", "",
                     table(["compressor", "settings", "reason"],
                           [[x["compressor"], json.dumps(x["settings"]), x["reason"]] for x in sweep["skipped"]]), ""]
    if unfinished:
        sections += ["## Unfinished configurations (rerun the sweep to complete them)", "",
                     table(["config", "missing"], unfinished), ""]
    heading = ""
    if speed:
        heading = (f"**{speed_title(speed[0])}**: each configuration measured interleaved with no compression, "
                   f"which its ratios are against")
    return Results("KV-cache compression sweep", header, sweep["model"], ppl, speed, heading,
                   [dict(label=c["label"], compressor=c["compressor"], settings=c["settings"],
                         kept=kept.get(c["label"], {}).get("kept_per_head"),
                         kv_bytes=kept.get(c["label"], {}).get("kv_bytes"),
                         kv_bytes_masked=kept.get(c["label"], {}).get("kv_bytes_masked")) for c in sweep["configs"]],
                   ppl_missing=sweep.get("ppl_skipped") or "No PPL results.", per_book=len(sweep["configs"]) <= 8,
                   lm_head=f"{arch['vocab']}x{arch['hidden']}" if arch else None, sections=sections, tasks=tasks)


def data_title(records: list[dict]) -> str:
    """E.g. '4 book(s) from ../shared/data/pg19-test, first 8192 tokens of each': for plot titles."""
    books = {r["book"]: r["source"] for r in records}
    limit = "full books" if records[0]["max_tokens"] is None else f"first {records[0]['max_tokens']} tokens of each"
    return f"{len(books)} book(s) from {', '.join(sorted({book_origin(x) for x in books.values()}))}, {limit}"


def complete_ppl(group: list[dict]) -> dict[str, float]:
    """label -> PPL over every book of the group, for the configurations that have scored them all."""
    books = {r["book"] for r in group}
    by: dict[str, list[dict]] = {}
    for r in group:
        by.setdefault(r["label"], []).append(r)
    return {label: _ppl(sum(r["nll_sum"] for r in rows), sum(r["tokens"] for r in rows))
            for label, rows in by.items() if {r["book"] for r in rows} == books}


def ppl_budget_plot(group: list[dict], model: str, out: Path, configs: list[dict], unit: str = "auto"
                    ) -> list[str]:
    """Figure (a), PPL vs KV budget, of one group of PPL records."""
    ppl = complete_ppl(group)
    first = {r["label"]: r for r in group}
    axis = budget_axis([c for c in configs if c["label"] in first], unit)
    if axis is None:  # folders without config.json: the entries kept per head each record states
        axis = ("kept KV entries per head", {label: r.get("kept_per_head") for label, r in first.items()})
    x_label, budget = axis
    if any(v is None for v in budget.values()):
        return ["(No PPL vs KV budget plot: these records predate the kept_per_head field; a new run adds it.)", ""]
    points = [dict(policy=line_name(first[label]["compressor"], first[label]["settings"]), kept=budget[label],
                   ppl=value) for label, value in ppl.items() if label != "none"]
    if not points:
        return []
    r = group[0]
    title = (f"Perplexity vs KV budget: {model}, {r['dtype']}\n{data_title(group)}; ctx_len {r['ctx_len']}, "
             f"stride {r['stride']}")
    plots.ppl_vs_budget(points, ppl.get("none"), r["window_prompt"] if x_label.startswith("kept") else 0, title,
                        out / "plots" / "ppl_vs_budget.png", x_label)
    return ["### PPL vs KV budget", "",
            "![PPL vs KV budget](plots/ppl_vs_budget.png)", "",
            f"Each window after the first prefills a {r['window_prompt']}-token prompt, compresses it and scores the "
            f"next {r['stride']} tokens through the compressed cache. Lines: each policy's lowest PPL at each budget; "
            f"dots: every configuration; dashed: full KV. Configurations that have not scored every book are left out.",
            ""]


def speed_panels(rows: list[dict], configs: list[dict]) -> dict[str, dict[str, list[dict]]]:
    """policy -> label -> rows, one configuration per budget: configurations keeping as many entries at every
    prompt length differ little in speed and not at all in memory, and the one closest to its policy's
    defaults stands for them (the tables list every configuration)."""
    order = {c["label"]: i for i, c in enumerate(configs)}
    by: dict[str, list[dict]] = {}
    for r in rows:
        if r["engine"] == "minipythia" and r["label"] != "none":
            by.setdefault(r["label"], []).append(r)
    chosen: dict[tuple, str] = {}
    for label, mine in sorted(by.items(), key=lambda item: order.get(item[0], len(order))):
        r = mine[0]
        budget = (r["compressor"], tuple(x["kept_after_prefill"] for x in sorted(mine, key=lambda x: x["prompt_len"])))
        best = chosen.get(budget)
        if best is None or (distance_from_defaults(r["compressor"], r["settings"])
                            < distance_from_defaults(r["compressor"], by[best][0]["settings"])):
            chosen[budget] = label
    panels: dict[str, dict[str, list[dict]]] = {}
    for (policy, _), label in sorted(chosen.items(), key=lambda item: (order.get(item[1], len(order)))):
        panels.setdefault(policy, {})[label] = [
            dict(x, kv_mib=x["kv_compressed_bytes"] / 2**20, compress_pct=100 * x["compress_ms"] / x["ttft_ms"])
            for x in by[label]]
    return panels


def speed_plots(rows: list[dict], configs: list[dict], out: Path) -> list[str]:
    """Figures (b) TPOT and KV memory vs prompt length and (c) compression overhead vs prompt length."""
    panels = speed_panels(rows, configs)
    if not panels:
        return []
    none_rows = [dict(r, kv_mib=r["kv_compressed_bytes"] / 2**20) for r in rows
                 if r["engine"] == "minipythia" and r["label"] == "none"]
    r = rows[0]
    about = f"{r['model']}, {r['dtype']}; prompts: {r['prompt_source']}; {r['new_tokens']} new tokens"
    plots.speed_vs_prompt(panels, none_rows, f"Decode time and KV memory vs prompt length: {about}",
                          out / "plots" / "speed_vs_prompt.png")
    plots.overhead_vs_prompt(panels, f"Compression overhead vs prompt length: {about}",
                             out / "plots" / "overhead_vs_prompt.png")
    return ["### TPOT and KV memory vs prompt length", "", "![TPOT and KV memory](plots/speed_vs_prompt.png)", "",
            "### Compression overhead vs prompt length", "", "![compression overhead](plots/overhead_vs_prompt.png)",
            "", "One configuration per policy and budget (the closest to the policy's defaults); the table above "
            "has them all.", ""]


def head_budget_section(configs: list[dict], ppl: list[dict], out: Path) -> list[str]:
    """For head-wise policies: the entries each (layer, head) kept, averaged over the windows of every book
    (a heatmap per configuration), and the bytes their caches hold next to what a cache that masks dropped
    entries instead of freeing them would hold (as kvpress's AdaKV does)."""
    by_label = {}
    for c in configs:
        rows = [r["kept_by_head"] for r in ppl if r["label"] == c["label"] and r.get("kept_by_head")]
        if rows:
            by_label[c["label"]] = [[sum(r[i][j] for r in rows) / len(rows) for j in range(len(rows[0][0]))]
                                    for i in range(len(rows[0]))]
    if not by_label:
        return []
    plots.head_budgets(by_label, "entries kept per head (rows: layers, columns: heads; mean over PPL windows)",
                       out / "plots" / "head_budgets.png")
    held = [[c["label"], f"{c['kv_bytes'] / 2**20:.3f}", f"{c['kv_bytes_masked'] / 2**20:.3f}"]
            for c in configs if c["label"] in by_label and c.get("kv_bytes_masked") is not None]
    return ["## Head-wise budgets", "", "![entries kept per head](plots/head_budgets.png)", "",
            *([table(["config", "KV MiB held", "KV MiB a masking cache holds (kvpress)"], held), ""] if held else [])]


def write_report(out: str | Path, budget: str = "auto", baseline: str | None = None) -> Path:
    """DIR/report.md, DIR/results.csv, DIR/summary.csv and DIR/plots/*.png from DIR/sweep.json and its folders
    (an older flat folder is moved into that layout first). budget: the x axis of the quality-vs-budget plots,
    entries kept per head or the KV bytes held (eval.budget; auto: bytes when some configuration is quantized).
    baseline: a configuration every other is also compared with (eval.summary), beside full KV."""
    out = Path(out)
    if not out.is_dir():
        raise ValueError(f"results directory {str(out)!r} does not exist")
    check_no_links_out(out)
    migrate_flat_layout(out)
    if not (out / "sweep.json").is_file():
        raise ValueError(f"{out} holds no sweep.json (nor the ppl.jsonl / speed.jsonl of an older run) to report on")
    results = load_sweep(out)
    summary = Summary(summary_rows(out, results, baseline))
    lines = [f"# {results.title}", ""] + results.header + results.sections
    lines += ["## Sliding-window perplexity", ""]
    group = ppl_groups(results.ppl)[-1] if results.ppl else []  # the latest setup, when a file holds several
    if results.ppl:
        lines += [ppl_tables(results.ppl, results.per_book)]
        lines += ppl_budget_plot(group, results.model, out, results.configs, budget)
    else:
        lines += [results.ppl_missing, ""]
    lines += task_section(results.configs, results.ppl, results.tasks, out, budget)
    lines += comparison_section(summary, results.configs, baseline)
    lines += head_budget_section(results.configs, results.ppl, out)
    lines += ["## Speed and KV memory", ""]
    if results.speed:
        lines += [results.speed_heading, "", speed_table(results.speed), "", SPEED_NOTES, ""]
        hf = [r for r in results.speed if r["engine"] == "transformers"]
        if hf:
            same = all(r.get("same_tokens") for r in hf)
            lines += [f"transformers produced {'the same' if same else 'different'} greedy tokens as minipythia "
                      f"without compression.", ""]
        lines += speed_plots(results.speed, results.configs, out)
    else:
        lines += ["No speed results.", ""]
    # Stream PPL (no stride) compresses no window prompt: the claims' PPL row is left unmeasured.
    window_prompt = group[0]["ctx_len"] - group[0]["stride"] if group and group[0]["stride"] else None
    lines += claims_section(results.configs, complete_ppl(group), window_prompt,
                            [r for r in results.speed if r["engine"] == "minipythia"], results.model, results.lm_head)
    lines += ["The figures above as one tidy table (a row per configuration and metric): `results.csv`; with their "
              "intervals, paired differences and oracle shares: `summary.csv` (docs/eval.md).", ""]
    if (out / "kept.html").is_file():  # written by python -m eval kept (eval.kept)
        lines += ["What each policy kept of one task prompt, against the oracle: [kept.html](kept.html).", ""]
    path = out / "report.md"
    write_text(path, "\n".join(lines))
    write_results_csv(out, results)
    write_summary_csv(out, summary.rows)
    return path


# The comparison section's metrics, in order: retained (PPL's, each task's), then PPL.
def _compared_metrics(summary: Summary) -> list[str]:
    names = list(dict.fromkeys(r["metric"] for r in summary.rows))
    return [m for m in names if m.startswith("retained_") and m != "retained_ppl_key_tokens"] + \
        [m for m in names if m == "ppl"]


def comparison_section(summary: Summary, configs: list[dict], baseline: str | None) -> list[str]:
    """Each configuration against full KV (and the baseline), metric by metric: the paired difference with its
    interval, bold where it excludes 0; and, at budgets where the sweep has the oracle, the share of the oracle's
    headroom each configuration reaches."""
    metrics = _compared_metrics(summary)
    if not metrics:
        return []
    lines = ["## Paired differences", "",
             "Each configuration minus the one compared with, over the windows and examples both scored, the same "
             "bootstrap draws for both (`ppl`: the relative change). **Bold**: the interval excludes 0, a difference "
             "this sample can tell apart; otherwise it cannot. Every row, with n and the intervals of the figures "
             "themselves: `summary.csv`.", ""]
    for vs in dict.fromkeys(x for x in ("none", baseline) if x):
        rows = []
        for c in configs:
            if c["label"] == vs:
                continue
            cells = [difference_text(summary.difference(c["label"], m, vs), percent=m == "ppl") for m in metrics]
            if any(cells):
                rows.append([c["label"]] + cells)
        if rows:
            lines += [f"**against {'full KV (none)' if vs == 'none' else vs}**", "", table(["config"] + metrics, rows),
                      ""]
    share = {(r["config"], r["metric"]): r["oracle_share"] for r in summary.rows
             if r.get("oracle_share") is not None and r["metric"] in metrics}
    if share:
        rows = [[c["label"]] + [f"{share[c['label'], m]:.2f}" if (c["label"], m) in share else "" for m in metrics]
                for c in configs if any((c["label"], m) in share for m in metrics)]
        lines += ["**Share of the oracle's headroom**: where each configuration lies between the worst configuration "
                  "at its budget (0) and the oracle at that budget (1); above 1: better than the oracle on that "
                  "metric (the oracle keeps what the future attends to most, which need not be what predicts it best).",
                  "", table(["config"] + metrics, rows), ""]
    return lines
