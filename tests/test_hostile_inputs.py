"""Input an attacker, or an unlucky network, would give: nothing hangs, nothing escapes the results folder,
nothing is silently not what it says. Each test is a case found by trying it (issue 24)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


# --- A network that accepts connections and never answers ----------------------------------------------------


@pytest.fixture
def silent_proxy():
    """http://127.0.0.1:PORT: accepts every connection and never sends a byte (a proxy dropping packets)."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(64)
    held, stop = [], threading.Event()

    def accept():
        server.settimeout(0.2)
        while not stop.is_set():
            try:
                held.append(server.accept()[0])
            except OSError:
                pass

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.getsockname()[1]}"
    stop.set()
    thread.join()
    for connection in held:
        connection.close()
    server.close()


def behind(proxy: str, tmp_path: Path, timeout_s: float) -> dict:
    """The environment of a user behind `proxy`, online as far as huggingface_hub knows, with an empty hub cache."""
    env = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_OFFLINE", "NO_PROXY", "no_proxy", "PG19_DIR")}
    env.update(HTTPS_PROXY=proxy, HTTP_PROXY=proxy, https_proxy=proxy, http_proxy=proxy, HF_HOME=str(tmp_path / "hf"),
               MINIPYTHIA_HUB_TIMEOUT=str(timeout_s), OMP_NUM_THREADS="1")
    return env


def finishes_within(seconds: float, work):
    """Runs work() in a thread and returns its result; fails (rather than hanging the suite) if it takes longer."""
    out = {}
    thread = threading.Thread(target=lambda: out.setdefault("value", work()), daemon=True)
    start = time.monotonic()
    thread.start()
    thread.join(seconds)
    assert not thread.is_alive(), f"still waiting on the hub after {seconds} s"
    return out.get("value"), time.monotonic() - start


def test_default_model_falls_back_within_the_hub_timeout_behind_a_silent_proxy(silent_proxy, tmp_path, monkeypatch,
                                                                              capsys):
    from minipythia.cli import resolve_model
    from minipythia.weights import EMBEDDED_MODEL

    for key, value in behind(silent_proxy, tmp_path, 0.5).items():
        monkeypatch.setenv(key, value)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", False)  # read at import, from make test's env
    finishes_within(30, lambda: resolve_model(None))  # warms the imports, which are not what is measured
    capsys.readouterr()
    choice, elapsed = finishes_within(30, lambda: resolve_model(None))
    assert choice.directory == EMBEDDED_MODEL
    # A request or two, each answered by the 0.5 s limit, not the library's 10 s and never the unbounded wait.
    assert 0.5 <= elapsed < 3, elapsed  # it did ask the proxy, and waited the limit
    notes = capsys.readouterr().err.strip().splitlines()
    assert len(notes) == 1 and "unreachable" in notes[0] and "tiny-pg19" in notes[0], notes


def test_generate_behind_a_silent_proxy_prints_one_line_and_uses_the_embedded_model(silent_proxy, tmp_path):
    start = time.monotonic()
    done = subprocess.run([sys.executable, "-m", "minipythia.generate", "--prompt", "Once", "--max-new-tokens", "2"],
                          cwd=ROOT, env=behind(silent_proxy, tmp_path, 1), capture_output=True, text=True, timeout=120)
    elapsed = time.monotonic() - start
    assert done.returncode == 0, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "unreachable" in lines[0] and "weights/tiny-pg19" in lines[0], done.stderr
    assert done.stdout.startswith("Once")
    assert elapsed < 60, elapsed  # imports and two tokens on a shared CPU; the hub part is bounded above


def test_pg19_from_the_hub_fails_in_one_line_within_the_timeout_behind_a_silent_proxy(silent_proxy, tmp_path,
                                                                                      monkeypatch, capsys):
    from eval.data import DataError, load_books

    for key, value in behind(silent_proxy, tmp_path, 0.5).items():
        monkeypatch.setenv(key, value)
    monkeypatch.delenv("PG19_DIR", raising=False)
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", False)
    import datasets  # noqa: F401  (the import is slow and not what is measured)

    def attempt():
        with pytest.raises(DataError) as raised:
            load_books(["pg19"], books=1)
        return str(raised.value)

    message, elapsed = finishes_within(30, attempt)
    assert 0.5 <= elapsed < 3, elapsed  # datasets alone would retry five times with backoff: half a minute
    assert "did not answer within 0.5 s" in message and "--data DIR" in message
    assert "Retry" not in capsys.readouterr().err


@pytest.mark.parametrize("value", ["0", "-1", "soon", "nan", "inf"])
def test_a_hub_timeout_that_is_not_a_positive_number_is_refused(monkeypatch, value):
    from minipythia.hub import HUB_TIMEOUT_ENV, hub_timeout

    monkeypatch.setenv(HUB_TIMEOUT_ENV, value)
    with pytest.raises(ValueError, match=HUB_TIMEOUT_ENV):
        hub_timeout()


# --- YAML that expands past any real sweep -------------------------------------------------------------------


def alias_bomb(levels: int = 9) -> str:
    """A YAML list of about 600 bytes whose aliases of aliases stand for 10^levels strings."""
    anchors = ['&a0 ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]']
    anchors += [f"&a{i} [" + ", ".join([f"*a{i - 1}"] * 10) + "]" for i in range(1, levels)]
    return "[" + ", ".join(anchors) + "]"


def sweep_error(tmp_path, capsys, text: str) -> str:
    """Runs `eval sweep` on a sweep file of `text`, asserting a one-line refusal (exit 2) that is short."""
    import tracemalloc

    import eval.__main__ as eval_cli
    from minipythia.cli import run_cli

    path = tmp_path / "sweep.yaml"
    path.write_text(text)
    tracemalloc.start()
    try:
        code = run_cli(eval_cli.main, ["sweep", str(path), "--out", str(tmp_path / "out"), "--model",
                                       str(tmp_path / "no-model")])
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    assert len(err) < 400, err
    assert peak < 50 * 2**20, peak  # nothing expanded
    assert not (tmp_path / "out").exists()
    return err


@pytest.mark.parametrize("where", [
    "model: {bomb}\npolicies: [{{compressor: none}}]",
    "policies: [{{compressor: knorm, compression_ratio: {bomb}}}]",
    "policies: {bomb}",
    "tasks: {bomb}\npolicies: [{{compressor: none}}]",
    "speed: {{prompt_lengths: {bomb}}}\npolicies: [{{compressor: none}}]",
    "data: {bomb}\npolicies: [{{compressor: none}}]",
])
def test_a_yaml_alias_bomb_is_refused_in_one_line(tmp_path, capsys, where):
    text = where.format(bomb=alias_bomb())
    assert len(text) < 1024
    err = sweep_error(tmp_path, capsys, text)
    assert "expands to more than" in err


def test_a_yaml_alias_that_contains_itself_is_refused(tmp_path, capsys):
    assert "expands to more than" in sweep_error(tmp_path, capsys, "model: &m [a, *m]\npolicies: [{compressor: none}]")


def test_yaml_nested_past_the_recursion_limit_is_refused(tmp_path, capsys):
    err = sweep_error(tmp_path, capsys, "policies: " + "[" * 5000 + "]" * 5000)
    assert "nesting depth" in err or "nests too deeply" in err  # libyaml's words, or ours without it


def test_axes_whose_product_is_absurd_are_refused_before_expanding(tmp_path, capsys):
    axes = ", ".join(f"{s}: [{', '.join(map(str, range(1, 11)))}]" for s in
                     ("window_size", "max_capacity_prompt", "kernel_size", "kv_group_size", "kv_residual"))
    err = sweep_error(tmp_path, capsys, f"policies: [{{compressor: snapkv, {axes}}}]")
    assert "100,000 configurations" in err


def test_a_huge_value_in_an_error_is_quoted_bounded(tmp_path, capsys):
    err = sweep_error(tmp_path, capsys, "mode: " + "x" * 100_000 + "\npolicies: [{compressor: none}]")
    assert "mode must be" in err


def test_an_alias_bomb_in_a_task_setting_on_the_command_line_is_refused(capsys):
    import eval.__main__ as eval_cli

    with pytest.raises(ValueError, match="expands to more than") as raised:
        eval_cli.task_settings([f"trials={alias_bomb()}"])
    assert len(str(raised.value)) < 200


# --- A config.json that is not its weights' -----------------------------------------------------------------


def with_config(checkpoint: Path, target: Path, **changes) -> Path:
    """A copy of the checkpoint whose config.json has `changes`; the weights are the same files."""
    import json
    import shutil

    shutil.copytree(checkpoint, target)
    config = json.loads((target / "config.json").read_text())
    (target / "config.json").write_text(json.dumps({**config, **changes}))
    return target


@pytest.mark.parametrize("field, value", [("hidden_size", 10**9), ("num_hidden_layers", 10**6),
                                          ("vocab_size", 10**9), ("intermediate_size", 10**9),
                                          ("hidden_size", 128), ("num_hidden_layers", 1)])
def test_a_config_that_disagrees_with_the_tensor_shapes_is_named_before_anything_is_built(
        tiny_checkpoint, tmp_path, capsys, field, value):
    from minipythia import Pythia
    from minipythia.cli import run_cli
    from minipythia.generate.__main__ import main as generate_main

    ckpt = with_config(tiny_checkpoint, tmp_path / "ckpt", **{field: value})
    start = time.monotonic()
    code = run_cli(generate_main, ["--model", str(ckpt), "--prompt", "the fox", "--max-new-tokens", "2"])
    err = capsys.readouterr().err
    assert time.monotonic() - start < 10
    assert code == 2 and "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    assert f"config.json says {field} {value}" in err, err
    with pytest.raises(ValueError, match=f"config.json says {field} {value}"):
        Pythia.from_pretrained(ckpt)


def test_a_sweep_refuses_a_config_that_disagrees_with_the_tensor_shapes(tiny_checkpoint, tmp_path, capsys):
    import eval.__main__ as eval_cli
    from minipythia.cli import run_cli

    ckpt = with_config(tiny_checkpoint, tmp_path / "ckpt", hidden_size=10**9)
    (tmp_path / "book.txt").write_text("the quick brown fox " * 50)
    code = run_cli(eval_cli.main, ["ppl", "--model", str(ckpt), "--data", str(tmp_path / "book.txt"),
                                   "--out", str(tmp_path / "out")])
    assert code == 2 and "config.json says hidden_size 1000000000" in capsys.readouterr().err


def test_a_config_claiming_a_billion_positions_costs_nothing_until_they_are_used(tiny_checkpoint, tmp_path):
    from minipythia import Pythia, generate

    ckpt = with_config(tiny_checkpoint, tmp_path / "ckpt", max_position_embeddings=10**9)
    model = Pythia.from_pretrained(ckpt).for_inference()
    reference = Pythia.from_pretrained(tiny_checkpoint).for_inference()
    out, elapsed = finishes_within(30, lambda: generate(model, [1, 2, 3], max_new_tokens=4).tokens)
    assert out == generate(reference, [1, 2, 3], max_new_tokens=4).tokens
    assert model._rotary_table[0].size(0) <= 2048


# --- Nothing escapes the results folder ---------------------------------------------------------------------


def files_outside(root: Path, out: Path) -> dict[str, bytes]:
    """Every file under root but not under out, by path, with its bytes (links as where they point)."""
    found = {}
    for path in sorted(root.rglob("*")):
        if path.is_relative_to(out):
            continue
        found[str(path)] = os.readlink(path).encode() if path.is_symlink() else \
            path.read_bytes() if path.is_file() else b"<dir>"
    return found


@pytest.mark.parametrize("axes, members", [
    ("model: [CK/child/.., OTHER]", ["ck/main", "other/main"]),  # ck/child/.. is ck, named by its real name
    ("model: CK/child\nrevision: [step1, '..']", ["child/--", "child/step1"]),  # child/.. is ck: a checkpoint
])
def test_model_paths_and_revisions_ending_in_dotdot_stay_inside_out(tiny_checkpoint, tmp_path, axes, members):
    import shutil

    import eval.__main__ as eval_cli
    from minipythia.cli import run_cli

    ck = tmp_path / "ck"
    shutil.copytree(tiny_checkpoint, ck)
    shutil.copytree(tiny_checkpoint, ck / "child" / "step1")
    shutil.copytree(tiny_checkpoint, tmp_path / "other")
    (tmp_path / "book.txt").write_text(" ".join(["the quick brown fox jumps over a lazy dog"] * 20))
    out = tmp_path / "out"
    axes = axes.replace("CK", str(ck)).replace("OTHER", str(tmp_path / "other"))
    (tmp_path / "sweep.yaml").write_text(f"{axes}\ndata: {tmp_path / 'book.txt'}\nctx_len: 32\nstride: 16\n"
                                         f"max_tokens: 64\npolicies: [{{compressor: none}}]\n")
    before = files_outside(tmp_path, out)
    assert run_cli(eval_cli.main, ["sweep", str(tmp_path / "sweep.yaml"), "--out", str(out)]) == 0
    assert files_outside(tmp_path, out) == before
    assert sorted(str(p.parent.relative_to(out)) for p in out.rglob("sweep.json")) == members
    assert (out / "report.md").read_text().startswith("# KV-cache compression across models")  # not overwritten


def test_revisions_that_fold_to_one_folder_are_refused(tiny_checkpoint, tmp_path, capsys):
    (tmp_path / "sweep.yaml").write_text(f"model: {tiny_checkpoint}\nrevision: [a/b, a-b]\n"
                                         f"policies: [{{compressor: none}}]\n")
    refused(capsys, ["sweep", str(tmp_path / "sweep.yaml"), "--out", str(tmp_path / "out")],
            "would share the results folder")
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").rglob("*.json"))


@pytest.fixture
def finished_sweep(tiny_checkpoint, tmp_path) -> Path:
    from conftest import tiny_sweep

    return tiny_sweep(tiny_checkpoint, tmp_path, "  - {compressor: none}\n  - {compressor: knorm}\n")


def victim(tmp_path: Path) -> Path:
    """A folder outside the results that looks like a configuration's, with a record report would quarantine."""
    folder = tmp_path / "victim"
    folder.mkdir()
    (folder / "ppl.jsonl").write_text('{"not": "a record"}\n')
    return folder


def refused(capsys, argv, *fragments):
    import eval.__main__ as eval_cli
    from minipythia.cli import run_cli

    code = run_cli(eval_cli.main, argv)
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    assert len(err.replace(str(Path(argv[-1]).parent), "")) < 300, err  # short, the paths it names aside
    for fragment in fragments:
        assert fragment in err, err


@pytest.mark.parametrize("folder", ["../victim", "VICTIM_ABSOLUTE", "knorm/../../victim", ""])
def test_report_refuses_a_sweep_json_that_names_a_folder_outside_dir(finished_sweep, tmp_path, capsys, folder):
    import json

    target = victim(tmp_path)
    sweep = json.loads((finished_sweep / "sweep.json").read_text())
    sweep["configs"][1]["folder"] = folder.replace("VICTIM_ABSOLUTE", str(target))
    (finished_sweep / "sweep.json").write_text(json.dumps(sweep))
    before = files_outside(tmp_path, finished_sweep)
    refused(capsys, ["report", str(finished_sweep)], "configs[1].folder", "not a folder inside")
    assert files_outside(tmp_path, finished_sweep) == before


def test_report_refuses_a_scale_json_that_names_a_folder_outside_dir(tmp_path, capsys, scale_grid):
    import json
    import shutil

    import eval.__main__ as eval_cli
    from minipythia.cli import run_cli

    out = tmp_path / "scale"
    shutil.copytree(scale_grid.parent, tmp_path / "grid")
    assert run_cli(eval_cli.main, ["sweep", str(tmp_path / "grid" / "scale.yaml"), "--out", str(out)]) == 0
    target = victim(tmp_path)
    shutil.copy(out / "narrow" / "step1" / "sweep.json", target / "sweep.json")
    index = json.loads((out / "scale.json").read_text())
    index["members"][0]["folder"] = "../victim"
    (out / "scale.json").write_text(json.dumps(index))
    capsys.readouterr()
    before = files_outside(tmp_path, out)
    refused(capsys, ["report", str(out)], "members[].folder", "not a folder inside")
    assert files_outside(tmp_path, out) == before


@pytest.mark.parametrize("link", ["knorm/ppl.jsonl", "knorm", "plots"])
def test_report_and_resume_refuse_a_link_that_leads_outside_dir(finished_sweep, tmp_path, capsys, link):
    import shutil

    target = victim(tmp_path)
    (target / "plots").mkdir()
    inside = finished_sweep / folder_of(finished_sweep, link)
    shutil.rmtree(inside) if inside.is_dir() else inside.unlink(missing_ok=True)
    inside.symlink_to(target / ("ppl.jsonl" if link.endswith(".jsonl") else "plots" if link == "plots" else ""))
    before = files_outside(tmp_path, finished_sweep)
    refused(capsys, ["report", str(finished_sweep)], "outside the results folder")
    refused(capsys, ["sweep", str(tmp_path / "s.yaml"), "--model", str(finished_sweep.parent / "unused"),
                     "--out", str(finished_sweep)], "outside the results folder")
    assert files_outside(tmp_path, finished_sweep) == before


def folder_of(out: Path, link: str) -> str:
    """`link` with its first part, a configuration's name (knorm), as the folder the sweep gave it."""
    first, _, rest = link.partition("/")
    if first == "plots":
        return link
    folder = next(p.name for p in out.iterdir() if p.is_dir() and p.name.startswith(first))
    return f"{folder}/{rest}" if rest else folder


# --- train.py never runs a pickle's code -------------------------------------------------------------------


class RunsCode:
    """Unpickled by a full pickle load, it creates the file it names: what a crafted state file could do."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


@pytest.mark.parametrize("saved", ["train-state/state.pt", "train-state/train-tokens.pt"])
def test_train_reads_its_state_files_without_running_pickled_code(tmp_path, capsys, saved):
    import torch

    from minipythia.cli import run_cli
    from minipythia.train import main

    books = tmp_path / "books"
    books.mkdir()
    for i in range(2):
        (books / f"b{i}.txt").write_text(" ".join(["a small cat sat on the warm mat"] * 300))
    out = tmp_path / "ckpt"
    args = [str(books), str(out), "--vocab-size", "300", "--layers", "1", "--hidden", "16", "--heads", "2",
            "--seq-len", "16", "--batch-size", "2", "--warmup", "1", "--eval-every", "2", "--save-every", "2",
            "--val-books", "1", "--steps", "2"]
    assert run_cli(main, args) == 0
    target = out / saved
    assert target.is_file()
    marker = tmp_path / "pickle-ran"
    torch.save({"model": RunsCode(str(marker))}, target)
    capsys.readouterr()
    assert run_cli(main, args) == 2
    assert not marker.exists()
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "is not a file this script saved" in errors[0] and "Traceback" not in err, err


# --- Data that is not there ---------------------------------------------------------------------------------

RECALL = "tasks: [ppl, {recall: {contexts: [96], depths: [0.5], trials: 2, passage_tokens: 16, cue_tokens: 4}}]"


def test_a_data_path_that_does_not_exist_is_an_error_even_with_tasks(tiny_checkpoint, tmp_path, capsys):
    (tmp_path / "s.yaml").write_text(f"{RECALL}\nctx_len: 64\nstride: 16\npolicies: [{{compressor: none}}]\n")
    refused(capsys, ["sweep", str(tmp_path / "s.yaml"), "--model", str(tiny_checkpoint), "--data",
                     str(tmp_path / "no-such-books"), "--out", str(tmp_path / "out")], "no-such-books", "does not exist")
    assert not (tmp_path / "out" / "sweep.json").exists()


def test_after_a_run_without_books_the_advice_to_add_them_works_as_written(tiny_checkpoint, tmp_path, capsys,
                                                                          monkeypatch):
    import eval.__main__ as eval_cli
    from minipythia.cli import run_cli

    monkeypatch.delenv("PG19_DIR", raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # no books at all: the default PG-19 cannot be had
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", True)
    (tmp_path / "s.yaml").write_text(f"{RECALL}\nctx_len: 64\nstride: 16\nmax_tokens: 160\n"
                                     f"policies: [{{compressor: none}}]\n")
    out = tmp_path / "out"
    assert run_cli(eval_cli.main, ["sweep", str(tmp_path / "s.yaml"), "--model", str(tiny_checkpoint),
                                   "--out", str(out)]) == 0
    advice = next(line for line in capsys.readouterr().err.splitlines() if line.startswith("No PPL"))
    assert "another --out" in advice
    books = tmp_path / "books"
    books.mkdir()
    (books / "a.txt").write_text(" ".join(["the quick brown fox jumps over a lazy dog"] * 40))
    # Into the same folder: refused in one short line naming the setting that differs.
    refused(capsys, ["sweep", str(tmp_path / "s.yaml"), "--model", str(tiny_checkpoint), "--data", str(books),
                     "--out", str(out)], "other settings (books: none there, ")
    # As the advice says: another --out.
    assert run_cli(eval_cli.main, ["sweep", str(tmp_path / "s.yaml"), "--model", str(tiny_checkpoint), "--data",
                                   str(books), "--out", str(tmp_path / "with-books")]) == 0
    assert (tmp_path / "with-books" / "none" / "ppl.jsonl").is_file()


# --- A PPL that compression could not change is not a clean 0 -------------------------------------------------


def test_a_book_shorter_than_one_window_is_warned_about_and_not_reported_lossless(tiny_checkpoint, tmp_path, capsys):
    import eval.__main__ as eval_cli
    from minipythia.cli import run_cli

    books = tmp_path / "books"
    books.mkdir()
    (books / "short.txt").write_text(" ".join(["the quick brown fox"] * 10))  # fewer tokens than ctx_len 96
    (tmp_path / "s.yaml").write_text(f"data: {books}\nctx_len: 96\nstride: 32\npolicies:\n  - {{compressor: none}}\n"
                                     f"  - {{compressor: snapkv, window_size: 4, max_capacity_prompt: 16}}\n")
    out = tmp_path / "out"
    assert run_cli(eval_cli.main, ["sweep", str(tmp_path / "s.yaml"), "--model", str(tiny_checkpoint),
                                   "--out", str(out)]) == 0
    err = capsys.readouterr().err
    assert "warning: book short has" in err and "every policy scores it as full KV" in err, err
    row = next(line for line in (out / "report.md").read_text().splitlines()
               if line.startswith("| snapkv") and "%" in line)
    assert "+0.00% (no compression: book shorter than one window)" in row, row


def test_a_budget_that_holds_the_whole_prompt_is_warned_about_and_reported_as_such(tiny_checkpoint, tmp_path, capsys):
    import eval.__main__ as eval_cli
    from minipythia.cli import run_cli

    books = tmp_path / "books"
    books.mkdir()
    (books / "long.txt").write_text(" ".join(["the quick brown fox jumps over a lazy dog"] * 40))
    (tmp_path / "s.yaml").write_text(f"data: {books}\nctx_len: 96\nstride: 32\nmax_tokens: 200\npolicies:\n"
                                     f"  - {{compressor: none}}\n"
                                     f"  - {{compressor: snapkv, window_size: 4, max_capacity_prompt: [16, 64]}}\n")
    out = tmp_path / "out"
    assert run_cli(eval_cli.main, ["sweep", str(tmp_path / "s.yaml"), "--model", str(tiny_checkpoint),
                                   "--out", str(out)]) == 0
    err = capsys.readouterr().err
    assert "c64" in err and "compresses nothing here" in err and "c16_" not in err.split("compresses nothing")[0]
    rows = {}
    for line in (out / "report.md").read_text().splitlines():
        if line.startswith("| snapkv") and "%" in line:
            rows.setdefault(line.split("|")[1].strip(), line)  # the PPL table's rows, the first with a change
    big, small = (next(v for k, v in rows.items() if f"_c{c}_" in k) for c in (64, 16))
    assert "(no compression: budget holds the whole prompt)" in big
    assert "no compression" not in small


# --- Ray: no dashboard, a quiet stop ------------------------------------------------------------------------


def test_a_local_ray_cluster_starts_no_dashboard():
    pytest.importorskip("ray")
    import psutil

    from eval.executors import RayCluster

    with RayCluster(None, 1):
        ours = psutil.Process().children(recursive=True)
        commands = [" ".join(p.cmdline()) for p in ours if p.is_running()]
        listening = [c.laddr.port for c in psutil.net_connections("tcp")
                     if c.status == psutil.CONN_LISTEN and c.pid in {p.pid for p in ours}]
    assert not [c for c in commands if "dashboard/dashboard.py" in c], commands
    assert 8265 not in listening


def test_sigterm_stops_a_ray_sweep_quietly_and_its_cluster_with_it(scale_grid, tmp_path):
    pytest.importorskip("ray")
    import signal

    import psutil

    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    sweep = subprocess.Popen([sys.executable, "-m", "eval", "sweep", str(scale_grid), "--out", str(tmp_path / "out"),
                              "--ray", "--workers", "1"], cwd=ROOT, env=env, stderr=subprocess.PIPE, text=True)
    seen = []
    for line in sweep.stderr:  # the cluster is up once the first member is planned on it
        seen.append(line)
        if line.startswith("== planning"):
            break
    children = psutil.Process(sweep.pid).children(recursive=True)
    assert children, "".join(seen)
    sweep.send_signal(signal.SIGTERM)
    err = "".join(seen) + sweep.stderr.read()
    assert sweep.wait(timeout=60) == 128 + signal.SIGTERM, err
    assert "terminated: stopping the Ray cluster" in err
    assert "SIGTERM received" not in err and "*** " not in err and "PC: @" not in err, err
    gone, alive = psutil.wait_procs(children, timeout=30)
    assert not alive, [p.name() for p in alive]
