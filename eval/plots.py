"""The report's figures, as PNG files: data in, picture out (eval.report decides what to plot).

matplotlib runs on its Agg backend: no display is needed, and the figures look the same everywhere.
"""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (after the backend is chosen)

DPI = 110


def _colors(names: list[str]) -> dict[str, str]:
    cycle = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    return {name: cycle[i % len(cycle)] for i, name in enumerate(names)}


def _save(fig, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=DPI, bbox_inches="tight")
    plt.close(fig)
    return path


def ppl_vs_budget(points: list[dict], full_ppl: float | None, window_prompt: int, title: str, path: Path,
                  x_label: str = "kept KV entries per head") -> Path:
    """points: {policy, kept, ppl} for every configuration. One line per policy through its lowest PPL at
    each budget (several variants can share a budget), every configuration as a faint dot, full KV dashed."""
    policies = list(dict.fromkeys(p["policy"] for p in points))
    colors = _colors(policies)
    fig, ax = plt.subplots(figsize=(8, 5))
    for policy in policies:
        mine = [p for p in points if p["policy"] == policy]
        best = {}
        for p in mine:
            best[p["kept"]] = min(best.get(p["kept"], p["ppl"]), p["ppl"])
        xs = sorted(best)
        label = policy + (f" (best per budget of {len(mine)} configs)" if len(mine) > len(xs) else "")
        ax.plot(xs, [best[x] for x in xs], marker="o", color=colors[policy], label=label)
        if len(mine) > len(xs):
            ax.scatter([p["kept"] for p in mine], [p["ppl"] for p in mine], s=12, alpha=0.3, color=colors[policy])
    if full_ppl is not None:
        ax.axhline(full_ppl, linestyle="--", color="black", label=f"full KV (none): {full_ppl:.2f}")
    ax.set_xlabel(f"{x_label} (of a {window_prompt}-token window prompt; mean over layers)" if window_prompt
                  else x_label)
    ax.set_ylabel("perplexity (PPL, lower is better)")
    if window_prompt > 0:
        top = ax.secondary_xaxis("top", functions=(lambda x: x / window_prompt, lambda f: f * window_prompt))
        top.set_xlabel("KV fraction kept")
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return _save(fig, path)


def _panels(panels: dict[str, dict[str, list[dict]]], metrics: list[tuple[str, str]], none_rows: list[dict],
            title: str, path: Path) -> Path:
    """A row of panels per metric, a column per policy: at one budget every policy keeps as many entries,
    so lines of several policies would lie on top of each other; side by side they stay readable.
    Each panel holds the policy's budgets (one configuration each) and no compression, dashed."""
    policies = list(panels)
    fig, axes = plt.subplots(len(metrics), len(policies), figsize=(3.6 * len(policies) + 1, 3.2 * len(metrics)),
                             sharex=True, sharey="row", squeeze=False)
    for col, policy in enumerate(policies):
        colors = _colors(list(panels[policy]))
        for row, (key, ylabel) in enumerate(metrics):
            ax = axes[row][col]
            if none_rows:
                rows = sorted(none_rows, key=lambda r: r["prompt_len"])
                ax.plot([r["prompt_len"] for r in rows], [r[key] for r in rows], linestyle="--", color="black",
                        marker=".", label="none (full KV)")
            for label, rows in panels[policy].items():
                rows = sorted(rows, key=lambda r: r["prompt_len"])
                ax.plot([r["prompt_len"] for r in rows], [r[key] for r in rows], marker="o", color=colors[label],
                        label=label)
            ax.grid(alpha=0.3)
            if row == 0:
                ax.set_title(policy, fontsize=10)
            if col == 0:
                ax.set_ylabel(ylabel, fontsize=9)
            if row == len(metrics) - 1:
                ax.set_xlabel("prompt length (tokens)")
        axes[0][col].legend(fontsize=7)
    for row in axes:  # once every panel is drawn: the rows share their y axis, scaled to all of them
        row[0].set_ylim(bottom=0)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return _save(fig, path)


def speed_vs_prompt(panels: dict[str, dict[str, list[dict]]], none_rows: list[dict], title: str, path: Path) -> Path:
    """panels: policy -> label -> [{prompt_len, tpot_ms, kv_mib}]: decode time and KV held, per prompt length."""
    return _panels(panels, [("tpot_ms", "time per output token\nTPOT (ms, mean of repeats)"),
                            ("kv_mib", "KV cache after prefill\n+ compression (MiB)")], none_rows, title, path)


def overhead_vs_prompt(panels: dict[str, dict[str, list[dict]]], title: str, path: Path) -> Path:
    """panels: policy -> label -> [{prompt_len, compress_ms, compress_pct}]: the compression's time."""
    return _panels(panels, [("compress_ms", "compression time\n(ms, mean of repeats)"),
                            ("compress_pct", "compression time\n(% of TTFT)")], [], title, path)


def retained_vs_budget(panels: dict[str, list[dict]], title: str, path: Path,
                       x_label: str = "kept KV entries per head") -> Path:
    """panels: task -> [{policy, kept, retained}]: a panel per task, a line per policy through its best
    retained at each budget, so that PPL and the retrieval tasks sit side by side on one y scale."""
    names = list(panels)
    policies = list(dict.fromkeys(p["policy"] for points in panels.values() for p in points))
    colors = _colors(policies)
    fig, axes = plt.subplots(1, len(names), figsize=(3.8 * len(names) + 1, 3.8), sharey=True, squeeze=False)
    for ax, name in zip(axes[0], names):
        for policy in policies:
            best = {}
            for p in panels[name]:
                if p["policy"] == policy:
                    best[p["kept"]] = max(best.get(p["kept"], p["retained"]), p["retained"])
            if best:
                xs = sorted(best)
                ax.plot(xs, [best[x] for x in xs], marker="o", color=colors[policy], label=policy)
        ax.axhline(1.0, linestyle="--", color="black", linewidth=1)
        ax.axhline(0.0, color="grey", linewidth=0.8)
        ax.set_title(name, fontsize=10)
        ax.set_xlabel(x_label, fontsize=8)
        ax.set_ylabel("retained (1 = full KV, 0 = no context)", fontsize=8)
        ax.tick_params(labelleft=True)  # every panel keeps its scale, though they share it
        ax.grid(alpha=0.3)
    axes[0][-1].legend(fontsize=7)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return _save(fig, path)


def retained_vs_bytes(panels: dict[str, list[dict]], title: str, path: Path) -> Path:
    """panels: task (or "PPL") -> [{policy, kv_bytes, retained, low, high}], low/high the 95% interval of
    retained (None: no bar). A panel per task, a line per policy through its best retained at each number of
    KV bytes held, each point with its interval bar; the policy's other configurations at those bytes as faint
    dots. Full KV's line at 1. At equal bytes, a policy whose bar lies above another's keeps more: the
    comparison that matters when memory is what is budgeted. One legend for every panel, under them."""
    names = list(panels)
    policies = list(dict.fromkeys(p["policy"] for points in panels.values() for p in points))
    colors = _colors(policies)
    # Each panel its own y range: one task's wide intervals would flatten the others'. Policies at the same bytes
    # are set a little apart (a share of the x range), so that their bars do not hide one another.
    fig, axes = plt.subplots(1, len(names), figsize=(4.2 * len(names) + 1, 4.2), squeeze=False)
    sizes = [p["kv_bytes"] / 2**20 for points in panels.values() for p in points]
    step = 0.012 * ((max(sizes) - min(sizes)) or max(sizes))
    for ax, name in zip(axes[0], names):
        for k, policy in enumerate(policies):
            mine = [p for p in panels[name] if p["policy"] == policy]
            best: dict[float, dict] = {}
            for p in mine:
                if p["kv_bytes"] not in best or p["retained"] > best[p["kv_bytes"]]["retained"]:
                    best[p["kv_bytes"]] = p
            if not best:
                continue
            line = [best[x] for x in sorted(best)]
            xs = [p["kv_bytes"] / 2**20 + (k - (len(policies) - 1) / 2) * step for p in line]
            ys = [p["retained"] for p in line]
            nan = float("nan")  # no interval: no bar (and no caps) at that point
            below = [p["retained"] - p["low"] if p.get("low") is not None else nan for p in line]
            above = [p["high"] - p["retained"] if p.get("high") is not None else nan for p in line]
            ax.errorbar(xs, ys, yerr=[below, above], marker="o", markersize=4, capsize=3, color=colors[policy],
                        label=policy)
            others = [p for p in mine if p not in line]
            if others:
                ax.scatter([p["kv_bytes"] / 2**20 + (k - (len(policies) - 1) / 2) * step for p in others],
                           [p["retained"] for p in others], s=12,
                           alpha=0.3, color=colors[policy])
        ax.axhline(1.0, linestyle="--", color="black", linewidth=1, label="full KV")
        ax.axhline(0.0, color="grey", linewidth=0.8)
        ax.set_title(name, fontsize=10)
        ax.set_xlabel("KV held (MiB)", fontsize=8)
        ax.set_ylabel("retained (1 = full KV, 0 = no context)", fontsize=8)
        ax.tick_params(labelleft=True)
        ax.grid(alpha=0.3)
    handles, labels = axes[0][0].get_legend_handles_labels()
    for ax in axes[0][1:]:  # a policy missing from the first panel still gets its legend entry
        for handle, label in zip(*ax.get_legend_handles_labels()):
            if label not in labels:
                handles.append(handle)
                labels.append(label)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    # under the figure, however many rows it takes (the saved picture grows to hold it: bbox_inches="tight")
    fig.legend(handles, labels, loc="upper center", bbox_to_anchor=(0.5, 0.0), ncol=min(len(labels), 4),
               fontsize=8, frameon=False)
    return _save(fig, path)


def wrap_label(label: str, width: int) -> str:
    """A configuration's label on lines of at most `width` characters, broken after its `_`s (a label like
    snapkv_w32_c256_k5_avgpool is wider than a small panel); a part longer than width keeps its own line."""
    lines = [""]
    for part in label.replace("_", "_\n").split("\n"):
        if lines[-1] and len(lines[-1]) + len(part) > width:
            lines.append("")
        lines[-1] += part
    return "\n".join(lines)


def colorbar_extend(values, low: float, high: float) -> str:
    """matplotlib's `extend` for a colour scale over [low, high]: an arrow at each end that values pass, so
    the picture says that a colour at the end stands for anything beyond it."""
    below, above = any(v < low for v in values), any(v > high for v in values)
    return {(False, False): "neither", (True, False): "min", (False, True): "max", (True, True): "both"}[below, above]


def heatmaps(by_label: dict[str, dict[tuple, tuple[float, int]]], title: str, row_name: str, col_name: str,
             path: Path) -> Path:
    """by_label: config -> (row, column) -> (value or None, examples): e.g. (depth, context), the needle-in-a-haystack
    picture, one heatmap per configuration, each cell showing its value and how many examples it rests on.
    The colour scale covers [0, 1]; values outside it take the end colours and the colour bar's arrows say so.
    row_name / col_name: the axis labels, with their units."""
    labels = [label for label, cells in by_label.items() if cells]
    depths = sorted({d for cells in by_label.values() for d, _ in cells})
    contexts = sorted({c for cells in by_label.values() for _, c in cells})
    cols = min(4, len(labels))
    rows = -(-len(labels) // cols)
    panel_w, panel_h = 1.2 + 0.75 * len(contexts), 1.4 + 0.5 * len(depths)
    # constrained layout makes room for every panel's title and labels and for the colour bar
    fig, axes = plt.subplots(rows, cols, figsize=(panel_w * cols + 1.2, panel_h * rows + 0.8), squeeze=False,
                             layout="constrained")
    for ax in axes.flat[len(labels):]:
        ax.axis("off")
    width = max(12, int(panel_w * 11))  # characters of a 7-point title that fit above one panel
    values = []
    for ax, label in zip(axes.flat, labels):
        grid = [[by_label[label].get((d, c)) for c in contexts] for d in depths]
        shown = [[float("nan") if cell is None or cell[0] is None else cell[0] for cell in row] for row in grid]
        values += [v for row in shown for v in row if v == v]
        image = ax.imshow(shown, vmin=0, vmax=1, cmap="RdYlGn", aspect="auto")
        for i, row in enumerate(grid):
            for j, cell in enumerate(row):
                if cell is not None:  # a value of None (undefined): a blank cell, its count still shown
                    value = "" if cell[0] is None else f"{cell[0]:.2f}\n"
                    ax.text(j, i, f"{value}n={cell[1]}", ha="center", va="center", fontsize=7)
        ax.set_xticks(range(len(contexts)), [str(c) for c in contexts], fontsize=7)
        ax.set_yticks(range(len(depths)), [f"{d:g}" for d in depths], fontsize=7)
        ax.set_title(wrap_label(label, width), fontsize=7)
        ax.set_xlabel(col_name, fontsize=7)
        ax.set_ylabel(row_name, fontsize=7)
    fig.suptitle(title, fontsize=9)
    bar = fig.colorbar(image, ax=axes, shrink=0.6, extend=colorbar_extend(values, 0.0, 1.0))
    bar.set_label("value (n = examples per cell)", fontsize=7)
    return _save(fig, path)


def head_budgets(by_label: dict[str, list[list[float]]], title: str, path: Path) -> Path:
    """by_label: config -> [layer][head] entries kept: one annotated heatmap per configuration."""
    labels = list(by_label)
    cols = min(3, len(labels))
    rows = -(-len(labels) // cols)
    layers, heads = len(by_label[labels[0]]), len(by_label[labels[0]][0])
    panel_w = 1.5 + 0.6 * heads
    fig, axes = plt.subplots(rows, cols, figsize=(panel_w * cols, 1.6 + 0.5 * layers * rows), squeeze=False)
    for ax in axes.flat[len(labels):]:
        ax.axis("off")
    for ax, label in zip(axes.flat, labels):
        grid = by_label[label]
        image = ax.imshow(grid, cmap="viridis", aspect="auto")
        for i, row in enumerate(grid):
            for j, v in enumerate(row):
                ax.text(j, i, f"{v:.0f}", ha="center", va="center", fontsize=6, color="white")
        ax.set_xticks(range(heads), [str(h) for h in range(heads)], fontsize=7)
        ax.set_yticks(range(layers), [str(i) for i in range(layers)], fontsize=7)
        ax.set_title(wrap_label(label, max(12, int(panel_w * 11))), fontsize=7)
        ax.set_xlabel("head", fontsize=7)
        ax.set_ylabel("layer", fontsize=7)
        bar = fig.colorbar(image, ax=ax, shrink=0.8)
        bar.set_label("KV kept per head (entries)", fontsize=6)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    return _save(fig, path)


def quality_vs_scale(panels: dict[str, dict[str, list[tuple[float, float]]]], metric: str, x_label: str,
                     log_x: bool, path: Path) -> Path:
    """panels: panel title -> configuration -> [(x, value)]: a line per configuration across model sizes or
    training steps, a panel per revision or model."""
    names = list(panels)
    labels = list(dict.fromkeys(label for lines in panels.values() for label in lines))
    colors = _colors(labels)
    fig, axes = plt.subplots(1, len(names), figsize=(4.5 * len(names) + 1, 4), sharey=True, squeeze=False)
    for ax, name in zip(axes[0], names):
        for label, points in panels[name].items():
            points = sorted(points)
            ax.plot([x for x, _ in points], [y for _, y in points], marker="o", color=colors[label], label=label)
        if log_x:
            ax.set_xscale("log")
        ax.axhline(0.0 if metric == "PPL vs none" else 1.0, linestyle="--", color="black", linewidth=1)
        ax.set_title(name, fontsize=10)
        ax.set_xlabel(x_label, fontsize=8)
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel(metric + (" (relative; 0 = full KV)" if metric == "PPL vs none" else " (1 = full KV)"))
    axes[0][-1].legend(fontsize=7)
    fig.tight_layout()
    return _save(fig, path)
