"""The package as a user installs it: a wheel built from the sources, installed (not editable) into a fresh
virtual environment, run from a directory that is not the clone, offline, with the runtime dependencies alone.

Slow (about a minute: a wheel build, a venv, a generation and a small sweep in subprocesses), which is why it is
one test. It needs no network: the venv is made without pip, the wheel is installed with --no-deps --no-index by
this interpreter's pip, and the runtime dependencies (torch, safetensors, ...) are seen through a .pth file naming
a folder of links to this interpreter's packages, less the test-only and optional ones (transformers, ray,
pytest, ...) and less the editable install of this clone.
"""

from __future__ import annotations

import csv
import os
import shutil
import subprocess
import sys
import sysconfig
import venv
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# What pyproject.toml's [project.optional-dependencies] add: the installed runtime must not need any of them.
EXTRAS = ("transformers", "ray", "pytest", "_pytest", "hypothesis", "_hypothesis", "psutil")


def runtime_packages(target: Path) -> Path:
    """A folder of links to this interpreter's installed packages less the extras (and less the editable install
    of this clone): what `pip install minipythia` without extras would have put beside the wheel."""
    target.mkdir()
    for entry in Path(sysconfig.get_paths()["purelib"]).iterdir():
        top = entry.name.split("-")[0].split(".")[0].lower()
        if top in EXTRAS or top.startswith("_hypothesis") or "minipythia" in entry.name or entry.suffix == ".pth":
            continue
        (target / entry.name).symlink_to(entry)
    return target


def copy_sources(target: Path) -> Path:
    """What a source distribution holds: pyproject, README, the two packages and weights/ (README, tiny-pg19);
    not the rest of a working clone (downloaded checkpoints, results, build folders)."""
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc", "train-state")
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(ROOT / name, target / name)
    for name in ("minipythia", "eval", "weights/tiny-pg19"):
        shutil.copytree(ROOT / name, target / name, ignore=ignore)
    shutil.copy2(ROOT / "weights" / "README.md", target / "weights" / "README.md")
    return target


def run(args, **kw):
    r = subprocess.run(args, capture_output=True, text=True, timeout=600, **kw)
    assert r.returncode == 0, f"{args}\n{r.stdout[-2000:]}\n{r.stderr[-4000:]}"
    return r


@pytest.mark.slow
def test_the_installed_wheel_generates_and_sweeps_offline_from_another_directory(tmp_path):
    (tmp_path / "src").mkdir()
    src = copy_sources(tmp_path / "src")
    run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index", "-q",
         "-w", str(tmp_path / "dist"), str(src)])
    wheel = next((tmp_path / "dist").glob("minipythia-*.whl"))
    shutil.rmtree(src)  # nothing of the sources is left to fall back on

    env_dir = tmp_path / "venv"
    venv.EnvBuilder(with_pip=False).create(env_dir)
    python = env_dir / "bin" / "python"
    site = Path(run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"]).stdout.strip())
    (site / "runtime_dependencies.pth").write_text(f"{runtime_packages(tmp_path / 'runtime')}\n")
    run([sys.executable, "-m", "pip", "--python", str(python), "install", "--no-deps", "--no-index", "-q", str(wheel)])

    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PG19_DIR", "VIRTUAL_ENV")}
    env.update(HF_HUB_OFFLINE="1", HF_HOME=str(tmp_path / "hf-home"), OMP_NUM_THREADS="1",
               PATH=f"{env_dir / 'bin'}{os.pathsep}{env.get('PATH', '')}")

    probe = subprocess.run([str(python), "-c", "import minipythia, minipythia_eval, importlib.util\n"
                            "print(minipythia.__file__); print(minipythia_eval.__file__)\n"
                            "print(importlib.util.find_spec('eval'))\n"
                            "from minipythia_eval.grid import load_spec; print(load_spec('compact').path)\n"
                            "import transformers"], cwd=elsewhere, env=env, capture_output=True, text=True, timeout=300)
    lines = probe.stdout.splitlines()
    assert len(lines) == 4, probe.stderr
    assert all(Path(f).is_relative_to(site) for f in lines[:2]), lines  # the installed copy, not the clone
    assert lines[2] == "None"  # no top-level package named eval
    assert Path(lines[3]).is_relative_to(site) and lines[3].endswith("configs/compact.yaml")
    assert "No module named 'transformers'" in probe.stderr  # the runtime runs without the extras

    r = run([str(env_dir / "bin" / "minipythia-generate"), "--prompt", "It was a dark and stormy night",
             "--max-new-tokens", "8", "--no-echo"], cwd=elsewhere, env=env)
    assert "using the embedded tiny-pg19" in r.stderr and r.stdout.strip()
    assert not r.stdout.startswith("It was a dark")

    (elsewhere / "books").mkdir()
    (elsewhere / "books" / "a.txt").write_text("The old men read long books by the sea. " * 60)
    (elsewhere / "small.yaml").write_text("data: books\nctx_len: 96\nstride: 32\nmax_tokens: 200\n"
                                          "speed: {prompt_lengths: [64], new_tokens: 5, repeats: 1}\n"
                                          "policies:\n  - {compressor: none}\n  - {compressor: snapkv, "
                                          "max_capacity_prompt: 32, window_size: 8}\n")
    r = run([str(env_dir / "bin" / "minipythia-eval"), "sweep", "small.yaml", "--out", "out"], cwd=elsewhere, env=env)
    rows = list(csv.DictReader((elsewhere / "out" / "results.csv").open()))
    assert [r["config"] for r in rows if r["metric"] == "ppl" and not r["book"]] == ["none", "snapkv_w8_c32_k5_avgpool"]
    assert all(r["model"] == "weights/tiny-pg19" for r in rows)
    assert [r["config"] for r in rows if r["metric"] == "tpot_ms" and r["prompt_len"] == "64"] == [
        "none", "snapkv_w8_c32_k5_avgpool"]
    assert (elsewhere / "out" / "report.md").is_file()

