"""Sweeps over models and revisions (eval.scale): the grid axes, the layout per (model, revision), resuming,
and the report across model sizes and training steps."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch

from conftest import result_files
from eval.__main__ import main
from eval.grid import ConfigError, parse_spec
from minipythia.cli import resolve_model, run_cli

MEMBERS = ["narrow/step1", "narrow/step2", "deep/step1", "deep/step2"]


@pytest.fixture(scope="module")
def scale_out(scale_grid, tmp_path_factory):
    out = tmp_path_factory.mktemp("scale-out") / "out"
    assert run_cli(main, ["sweep", str(scale_grid), "--out", str(out)]) == 0
    return out


def test_model_and_revision_lists_are_axes():
    spec = parse_spec("model: [a, b]\nrevision: [step1, null]\npolicies: [{compressor: none}]", Path("s.yaml"))
    assert spec.members == [("a", "step1"), ("a", None), ("b", "step1"), ("b", None)]
    single = parse_spec("model: a\npolicies: [{compressor: none}]", Path("s.yaml"))
    assert single.members == [("a", None)] and single.model == "a"


@pytest.mark.parametrize("text,fragment", [
    ("model: [a, a]", "lists 'a' twice"),
    ("model: [a, 3]", "model must be a name or a list of names"),
    ("model: null", "model must be a name"),
    ("revision: []", "revision must be a name"),
])
def test_bad_axes_are_config_errors(text, fragment):
    with pytest.raises(ConfigError, match=fragment):
        parse_spec(text + "\npolicies: [{compressor: none}]", Path("s.yaml"))


def test_a_local_directory_s_revision_is_its_subfolder(scale_grid):
    root = scale_grid.parent
    assert resolve_model(str(root / "deep"), "step2").directory == root / "deep" / "step2"
    with pytest.raises(ValueError, match="without a checkpoint folder step9/"):
        resolve_model(str(root / "deep"), "step9")


def test_a_sweep_per_model_and_revision(scale_out, scale_grid):
    index = json.loads((scale_out / "scale.json").read_text())
    assert [m["folder"] for m in index["members"]] == MEMBERS
    parameters = {}
    for member in MEMBERS:
        summary = json.loads((scale_out / member / "sweep.json").read_text())
        model, revision = member.split("/")
        assert summary["model"] == str(scale_grid.parent / model) and summary["revision"] == revision
        assert summary["checkpoint"] == str(scale_grid.parent / model / revision)
        parameters[member] = summary["parameters"]
        for label in ("none", "snapkv_w4_c16_k5_avgpool", "knorm_r0.5"):
            records = [json.loads(line) for line in (scale_out / member / label / "ppl.jsonl").read_text().splitlines()]
            assert [r["book"] for r in records] == ["alpha", "beta"]
            assert all(r["revision"] == revision for r in records)
            assert (scale_out / member / label / "recall.jsonl").is_file()
    # the two shapes really are two models; the revisions of one share it
    assert parameters["narrow/step1"] == parameters["narrow/step2"] != parameters["deep/step1"]
    nll = {m: json.loads((scale_out / m / "none" / "ppl.jsonl").read_text().splitlines()[0])["nll_sum"] for m in MEMBERS}
    assert len(set(nll.values())) == 4  # other weights, other NLLs: each member loaded its own checkpoint


def test_the_report_sets_members_side_by_side(scale_out):
    report = (scale_out / "report.md").read_text()
    assert "| config | narrow@step1 | narrow@step2 | deep@step1 | deep@step2 |" in report
    assert "## PPL vs none" in report and "## retained: recall" in report
    assert "plots/scale_size_PPL_vs_none.png" in report and "plots/scale_step_PPL_vs_none.png" in report
    assert (scale_out / "plots" / "scale_size_PPL_vs_none.png").stat().st_size > 0
    none_row = next(line for line in report.splitlines() if line.startswith("| none |"))
    assert none_row.count("+0.00% [+0.00%, +0.00%]") == 4  # none against itself: exactly 0, paired
    # each cell is that member's PPL change, from its own records
    label = "snapkv_w4_c16_k5_avgpool"
    expected = []
    for member in MEMBERS:
        ppl = {}
        for name in ("none", label):
            records = [json.loads(x) for x in (scale_out / member / name / "ppl.jsonl").read_text().splitlines()]
            ppl[name] = math.exp(sum(r["nll_sum"] for r in records) / sum(r["tokens"] for r in records))
        expected.append(f"{100 * (ppl[label] / ppl['none'] - 1):+.2f}%")
    section = report.split("## PPL vs none")[1]
    row = next(line for line in section.splitlines() if line.startswith(f"| {label} |"))
    cells = [cell.strip() for cell in row.split("|")[2:-1]]  # each member's change with its paired interval
    assert [cell.split(" [")[0] for cell in cells] == expected and all(" [" in cell for cell in cells)
    # OUT/results.csv: every member's rows under one header, the same change vs none
    import csv

    rows = list(csv.DictReader((scale_out / "results.csv").open()))
    changes = [float(r["value"]) for r in rows if r["config"] == label and r["metric"] == "ppl_vs_none"]
    assert [f"{100 * x:+.2f}%" for x in changes] == expected
    assert [(Path(r["model"]).name, r["revision"]) for r in rows if r["config"] == label and
            r["metric"] == "ppl_vs_none"] == [tuple(m.split("/")) for m in MEMBERS]
    # OUT/summary.csv: every member's summary, its paired change vs none the same as the report's
    rows = list(csv.DictReader((scale_out / "summary.csv").open()))
    changes = [float(r["diff"]) for r in rows if r["config"] == label and r["metric"] == "ppl" and r["vs"] == "none"]
    assert [f"{100 * x:+.2f}%" for x in changes] == expected


def test_a_rerun_resumes_and_adds_nothing(scale_out, scale_grid, tmp_path):
    out = tmp_path / "out"
    shutil.copytree(scale_out, out)
    before = result_files(out)
    # an interrupted member: its last configuration lost a book and its recall examples
    path = out / "deep" / "step2" / "knorm_r0.5" / "ppl.jsonl"
    path.write_text(path.read_text().splitlines()[0] + "\n")
    (out / "deep" / "step2" / "knorm_r0.5" / "recall.jsonl").unlink()
    assert run_cli(main, ["sweep", str(scale_grid), "--out", str(out)]) == 0
    assert result_files(out) == before


def test_folders_of_one_kind_are_not_mixed(scale_out, scale_grid, tmp_path, capsys):
    member = scale_out / "narrow" / "step1"
    assert run_cli(main, ["sweep", str(scale_grid), "--out", str(member)]) == 2
    assert "holds a sweep of one model" in capsys.readouterr().err
    assert run_cli(main, ["sweep", str(scale_grid), "--model", str(scale_grid.parent / "deep"), "--revision",
                          "step1", "--out", str(scale_out)]) == 2
    assert "holds a sweep over models or revisions" in capsys.readouterr().err


def test_two_models_of_one_folder_name_are_refused(scale_grid, tmp_path, capsys):
    other = tmp_path / "elsewhere" / "deep"
    shutil.copytree(scale_grid.parent / "deep", other)
    assert run_cli(main, ["sweep", str(scale_grid), "--model", str(scale_grid.parent / "deep"), str(other),
                          "--out", str(tmp_path / "out")]) == 2
    assert "would share the results folder deep/" in capsys.readouterr().err


def test_report_regenerates_every_member(scale_out, tmp_path):
    out = tmp_path / "out"
    shutil.copytree(scale_out, out)
    (out / "report.md").unlink()
    (out / "deep" / "step1" / "report.md").unlink()
    assert run_cli(main, ["report", str(out)]) == 0
    assert (out / "report.md").is_file() and (out / "deep" / "step1" / "report.md").is_file()


@pytest.mark.parametrize("device,fragment", [("tpu", "give cpu, cuda or cuda:N"), ("cuda:x", "give cpu, cuda or cuda:N")]
                         + ([] if torch.cuda.is_available() else [("cuda", "has no CUDA device")]))
def test_a_device_the_machine_lacks_is_a_one_line_error(scale_grid, tmp_path, capsys, device, fragment):
    assert run_cli(main, ["sweep", str(scale_grid), "--device", device, "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip()
    assert fragment in err and "\n" not in err and not (tmp_path / "out").exists()


@pytest.mark.parametrize("path", sorted((Path(__file__).resolve().parents[1] / "eval" / "configs").glob("*.yaml")),
                         ids=lambda p: p.name)
def test_every_shipped_config_parses_and_expands_on_pythia_70m(path):
    from eval.grid import expand, load_spec
    from minipythia.config import config_for_size

    spec = load_spec(path)
    grid = expand(spec.policies, config_for_size("70m"))
    assert grid.configs and len({c.label for c in grid.configs}) == len(grid.configs)
    if path.name == "scale.yaml":
        assert len(spec.members) == 12 and spec.batch_windows == 8
