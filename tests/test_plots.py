"""Each report figure rendered once from a small synthetic input (matplotlib's Agg backend), with the things
that make it readable checked on the figure itself: wrapped panel titles, a colour bar that says when values
fall outside its scale, axis labels with units on every panel, the examples behind each heatmap cell."""

import matplotlib.pyplot as plt
import pytest

from eval import plots

LONG = ["snapkv_w32_c256_k5_avgpool", "snapkv_w32_c1024_k5_avgpool", "streaming_llm_sink4_c512", "knorm_r0.75",
        "h2o_c512_recent0.5"]


@pytest.fixture
def figures(monkeypatch):
    """The figures the plot functions make, kept open after saving so that a test can look at them."""
    made, close = [], plt.close
    monkeypatch.setattr(plt, "close", lambda fig=None: made.append(fig))
    yield made
    for fig in made:
        close(fig)


def cells(value_of, contexts=(256, 512, 960)):
    return {(depth, context): (value_of(depth, context), 2 + int(10 * depth))
            for depth in (0.1, 0.5, 0.9) for context in contexts}


def assert_titles_fit(fig, panels):
    """Each panel's title is no wider than its panel (a little overhang aside), so neighbours' cannot overlap."""
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    for ax in panels:
        assert ax.title.get_window_extent(renderer).width <= ax.get_window_extent(renderer).width * 1.15


def saved(path):
    assert path.is_file() and path.stat().st_size > 1000
    return path


def test_wrap_label_breaks_long_labels_at_underscores():
    wrapped = plots.wrap_label("snapkv_w32_c256_k5_avgpool", 12)
    assert wrapped.replace("\n", "") == "snapkv_w32_c256_k5_avgpool"
    assert all(len(line) <= 12 for line in wrapped.split("\n")) and wrapped.count("\n") >= 2
    assert plots.wrap_label("none", 12) == "none"


@pytest.mark.parametrize("values, extend", [([0.0, 0.5, 1.0], "neither"), ([-0.2, 0.5], "min"), ([0.5, 1.3], "max"),
                                            ([-0.1, 1.1], "both")])
def test_colorbar_extends_where_values_leave_the_scale(values, extend):
    assert plots.colorbar_extend(values, 0.0, 1.0) == extend


@pytest.mark.parametrize("contexts", [(256,), (256, 512, 960)])  # one context: narrow panels, long titles
def test_heatmaps_are_readable(tmp_path, figures, contexts):
    by_label = {label: cells(lambda d, c, i=i: 1.2 - 0.35 * i * d, contexts)  # some > 1, some < 0
                for i, label in enumerate(LONG)}
    saved(plots.heatmaps(by_label, "recall (retained) by depth (rows) and context (columns)",
                         "depth (share of context)", "context (tokens)", tmp_path / "heatmap.png"))
    fig = figures[-1]
    panels = [ax for ax in fig.axes if ax.images]
    assert len(panels) == len(LONG)
    for ax in panels:
        assert ax.get_xlabel() == "context (tokens)" and ax.get_ylabel() == "depth (share of context)"
        assert any(t.get_text().endswith("\nn=11") for t in ax.texts)  # depth 0.9: 11 examples
    bar = next(ax for ax in fig.axes if not ax.images and ax.get_label() == "<colorbar>")
    assert bar.get_ylabel().startswith("value")
    assert fig.axes[-1]._colorbar.extend == "both"
    assert_titles_fit(fig, panels)
    if len(contexts) == 1:
        assert all("\n" in ax.get_title() for ax in panels if len(ax.get_title()) > 20)
    renderer = fig.canvas.get_renderer()
    boxes = sorted((ax.title.get_window_extent(renderer) for ax in panels), key=lambda b: (round(b.y0), b.x0))
    for a, b in zip(boxes, boxes[1:]):  # neighbours in a row of panels
        if round(a.y0) == round(b.y0):
            assert a.x1 <= b.x0


def test_heatmaps_within_the_scale_do_not_extend_it(tmp_path, figures):
    undefined = {**cells(lambda d, c: d), (0.7, 256): (None, 4)}  # retained undefined there: blank, count shown
    saved(plots.heatmaps({"none": cells(lambda d, c: 1.0), "knorm_r0.5": undefined}, "needle", "depth", "context",
                         tmp_path / "heatmap.png"))
    assert figures[-1].axes[-1]._colorbar.extend == "neither"
    assert "n=4" in [t.get_text() for t in figures[-1].axes[1].texts]


def test_retained_vs_bytes(tmp_path, figures):
    panels = {}
    for task in ("PPL", "recall", "needle"):
        panels[task] = [dict(policy=policy, kv_bytes=mib * 2**20, retained=r,  # knorm: no interval, no bar
                             low=None if policy == "knorm" else r - 0.1, high=None if policy == "knorm" else r + 0.05)
                        for policy, shift in (("snapkv", 0.0), ("streaming_llm", -0.2), ("knorm", -0.3))
                        for mib, r in ((0.5, 0.4 + shift), (1.0, 0.7 + shift), (2.0, 0.9 + shift))]
    panels["recall"].append(dict(policy="snapkv", kv_bytes=2**20, retained=0.5, low=0.4, high=0.6))  # a worse variant
    saved(plots.retained_vs_bytes(panels, "retained vs KV bytes held", tmp_path / "retained_vs_bytes.png"))
    fig = figures[-1]
    axes = [ax for ax in fig.axes if ax.get_title()]
    assert [ax.get_title() for ax in axes] == ["PPL", "recall", "needle"]
    for ax in axes:
        assert ax.get_xlabel() == "KV held (MiB)" and ax.get_ylabel().startswith("retained")
        assert any(list(line.get_ydata()) == [1.0, 1.0] for line in ax.lines)  # full KV's line
        xs = sorted({round(x, 6) for line in ax.lines for x in line.get_xdata() if line.get_marker() == "o"})
        # x in MiB, the three policies at each size set a little apart (1.2% of the x range each)
        assert xs == pytest.approx([m + d * 0.012 * 1.5 for m in (0.5, 1.0, 2.0) for d in (-1, 0, 1)])
    bars = [c for c in axes[1].containers if hasattr(c, "has_yerr")]
    assert [c.has_yerr for c in bars] == [True, True, True]
    snapkv = bars[0].lines[0]
    assert list(snapkv.get_ydata()) == pytest.approx([0.4, 0.7, 0.9])  # the best at each size, not the variant
    labels = [t.get_text() for t in fig.legends[0].get_texts()]
    assert sorted(labels) == sorted(["snapkv", "streaming_llm", "knorm", "full KV"])
    assert len(fig.legends) == 1 and not any(ax.get_legend() for ax in axes)  # one legend, under the panels


def test_retained_vs_budget_and_head_budgets_label_every_panel(tmp_path, figures):
    panels = {task: [dict(policy="snapkv", kept=k, retained=k / 1024) for k in (256, 512)]
              for task in ("PPL", "recall")}
    saved(plots.retained_vs_budget(panels, "retained", tmp_path / "budget.png", "KV kept per head (entries)"))
    for ax in figures[-1].axes:
        assert ax.get_ylabel().startswith("retained") and ax.get_xlabel() == "KV kept per head (entries)"
    by_label = {label: [[float(10 * layer + head) for head in range(4)] for layer in range(3)] for label in LONG[:4]}
    saved(plots.head_budgets(by_label, "entries kept per head", tmp_path / "heads.png"))
    panels = [ax for ax in figures[-1].axes if ax.images]
    assert all(ax.get_xlabel() == "head" and ax.get_ylabel() == "layer" for ax in panels)
    assert_titles_fit(figures[-1], panels)
