"""Nothing silent, nothing lost: each defect found by trying the tool as a new user would, as a test.

Bad input is one line and exit code 2 (CLI) or a ValueError with the same text (API), found before any work;
NaN never becomes a result; result folders survive damage and concurrent runs.
"""

import json
import math
import re
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import eval.__main__ as eval_cli
from eval.results import read_jsonl
from minipythia import KVCache, Pythia, SnapKV, generate
from minipythia.cli import run_cli
from minipythia.generate.__main__ import main as generate_main

WORDS = "the quick brown fox jumps over a lazy dog while seven old men read long books by the sea".split()


@pytest.fixture
def book(tmp_path) -> Path:
    path = tmp_path / "book.txt"
    path.write_text(" ".join(WORDS[i * 7 % len(WORDS)] for i in range(150)))
    return path


def copy_checkpoint(tiny_checkpoint, tmp_path) -> Path:
    target = tmp_path / "ckpt"
    shutil.copytree(tiny_checkpoint, target)
    return target


def one_line_error(capsys, *fragments):
    """The error is one line on stderr (progress bars of the work done before it aside), without a traceback."""
    err = capsys.readouterr().err
    errors = re.findall(r"error: [^\r\n]*", err)
    assert len(errors) == 1 and "Traceback" not in err, err
    for fragment in fragments:
        assert fragment in errors[0], err
    return errors[0]


def generate_cli(ckpt, *extra):
    return run_cli(generate_main, ["--model", str(ckpt), "--prompt", "the quick brown fox", "--max-new-tokens", "3",
                                   *map(str, extra)])


# --- NaN is never a result ----------------------------------------------------------------------------------


@pytest.fixture
def nan_checkpoint(tiny_checkpoint, tmp_path) -> Path:
    """The tiny checkpoint with one NaN weight in layer 1's MLP."""
    ckpt = copy_checkpoint(tiny_checkpoint, tmp_path)
    tensors = load_file(ckpt / "model.safetensors")
    tensors["gpt_neox.layers.1.mlp.dense_h_to_4h.weight"][3, 5] = float("nan")
    save_file(tensors, ckpt / "model.safetensors")
    return ckpt


def test_nan_logits_stop_generate_naming_where_they_appear(nan_checkpoint, capsys):
    model = Pythia.from_pretrained(nan_checkpoint).for_inference()
    with pytest.raises(ValueError, match="layer 1's MLP at position 0.*layers.1.mlp.dense_h_to_4h.weight"):
        generate(model, [1, 2, 3], max_new_tokens=2)
    assert generate_cli(nan_checkpoint) == 2  # it used to print <|endoftext|> and exit 0
    one_line_error(capsys, "not finite", "layer 1's MLP")


def test_nan_is_never_written_as_a_ppl_result(nan_checkpoint, book, tmp_path, capsys):
    out = tmp_path / "out"
    argv = ["ppl", "--model", str(nan_checkpoint), "--data", str(book), "--ctx-len", "32", "--out", str(out)]
    assert run_cli(eval_cli.main, argv) == 2
    one_line_error(capsys, "non-finite NLL", "window of tokens 0..32", "layer 1's MLP")
    assert not list(out.glob("*/ppl.jsonl"))  # nothing written, so nothing a rerun would take as done


def test_a_nan_or_cut_record_is_quarantined_and_computed_again(tiny_checkpoint, book, tmp_path, capsys):
    out = tmp_path / "out"
    argv = ["ppl", "--model", str(tiny_checkpoint), "--data", str(book), "--ctx-len", "32", "--out", str(out)]
    assert run_cli(eval_cli.main, argv) == 0
    path = out / "none" / "ppl.jsonl"
    good = path.read_text()
    record = json.loads(good)
    path.write_text(good.replace(str(record["nll_sum"]), "NaN") + '{"book": "cut off')  # NaN, and a torn line
    capsys.readouterr()
    assert run_cli(eval_cli.main, argv) == 0
    err = capsys.readouterr().err
    assert err.count("moved to ppl.jsonl.quarantine") == 2
    [again] = read_jsonl(path)  # recomputed, the same (a record holds results only; timings go to units.jsonl)
    assert again == record
    for line in path.read_text().splitlines():
        json.loads(line, parse_constant=lambda c: pytest.fail(f"{c} in a result file"))
    assert len((out / "none" / "ppl.jsonl.quarantine").read_text().splitlines()) == 2


def test_training_stops_at_a_non_finite_loss(tmp_path, capsys):
    from minipythia.train import main as train_main

    books = tmp_path / "books"
    books.mkdir()
    for i in range(3):
        (books / f"b{i}.txt").write_text(" ".join(WORDS[(i + j * 5) % len(WORDS)] for j in range(400)))
    argv = [str(books), str(tmp_path / "out"), "--layers", "1", "--hidden", "16", "--heads", "2", "--steps", "3",
            "--seq-len", "16", "--batch-size", "2", "--vocab-size", "300", "--val-books", "1", "--lr", "1e30",
            "--warmup", "0"]
    assert run_cli(train_main, argv) == 2
    one_line_error(capsys, "step", "lower --lr")


# --- ids and tokenizers ---------------------------------------------------------------------------------------


def test_ids_outside_the_vocabulary_are_named(tiny_checkpoint):
    model = Pythia.from_pretrained(tiny_checkpoint).for_inference()
    vocab = model.config.vocab_size
    for ids in ([1, vocab], [-1, 2]):
        with pytest.raises(ValueError, match="outside the model's vocabulary.*another tokenizer"):
            generate(model, ids, max_new_tokens=1)
    with pytest.raises(ValueError, match="outside the model's vocabulary"):
        model(torch.tensor([[vocab + 5]]))
    with pytest.raises(ValueError, match="integer token ids"):
        model(torch.tensor([[1.0, 2.0]]))
    with pytest.raises(ValueError, match="token ids"):
        generate(model, [1.5, 2.0], max_new_tokens=1)


def test_a_tokenizer_of_another_model_is_refused(tiny_checkpoint, tmp_path, capsys):
    ckpt = copy_checkpoint(tiny_checkpoint, tmp_path)
    config = json.loads((ckpt / "config.json").read_text())
    tensors = load_file(ckpt / "model.safetensors")
    small = 100  # fewer ids than the tokenizer makes
    config["vocab_size"] = small
    tensors["gpt_neox.embed_in.weight"] = tensors["gpt_neox.embed_in.weight"][:small].contiguous()
    tensors["embed_out.weight"] = tensors["embed_out.weight"][:small].contiguous()
    (ckpt / "config.json").write_text(json.dumps(config))
    save_file(tensors, ckpt / "model.safetensors")
    assert generate_cli(ckpt) == 2
    one_line_error(capsys, "the model's vocabulary has 100", "give the tokenizer of this checkpoint")
    (tmp_path / "book.txt").write_text("the quick brown fox " * 20)
    assert run_cli(eval_cli.main, ["ppl", "--model", str(ckpt), "--data", str(tmp_path / "book.txt"),
                                   "--out", str(tmp_path / "out")]) == 2
    one_line_error(capsys, "give the tokenizer of this checkpoint")


# --- checkpoint files -----------------------------------------------------------------------------------------


def damage(ckpt: Path, what: str):
    if what == "truncated weights":
        data = (ckpt / "model.safetensors").read_bytes()
        (ckpt / "model.safetensors").write_bytes(data[: len(data) // 2])
    elif what == "config not json":
        (ckpt / "config.json").write_text("{not json")
    elif what == "config without a key":
        config = json.loads((ckpt / "config.json").read_text())
        del config["hidden_size"]
        (ckpt / "config.json").write_text(json.dumps(config))
    elif what == "config with a wrong type":
        config = json.loads((ckpt / "config.json").read_text())
        config["num_hidden_layers"] = "two"
        (ckpt / "config.json").write_text(json.dumps(config))
    elif what == "tokenizer not json":
        (ckpt / "tokenizer.json").write_text("garbage")
    elif what == "index without a weight map":
        (ckpt / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}}))
    elif what == "index naming a missing shard":
        (ckpt / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"x": "model-00001.safetensors"}}))
    elif what == "weights not a checkpoint":
        (ckpt / "model.safetensors").unlink()
        (ckpt / "pytorch_model.bin").write_bytes(b"\x00" * 64)


@pytest.mark.parametrize("what,fragment", [
    ("truncated weights", "not a readable safetensors file"), ("config not json", "is not valid JSON"),
    ("config without a key", "lacks hidden_size"), ("config with a wrong type", "num_hidden_layers must be"),
    ("tokenizer not json", "not a tokenizer.json"), ("index without a weight map", "not a safetensors index"),
    ("index naming a missing shard", "model-00001.safetensors"), ("weights not a checkpoint", "cannot be read"),
])
def test_damaged_checkpoint_files_are_one_line_errors(tiny_checkpoint, tmp_path, capsys, what, fragment):
    ckpt = copy_checkpoint(tiny_checkpoint, tmp_path)
    damage(ckpt, what)
    assert generate_cli(ckpt) == 2
    one_line_error(capsys, fragment)


def test_a_head_saved_as_lm_head_loads_the_same(tiny_checkpoint, tmp_path):
    ckpt = copy_checkpoint(tiny_checkpoint, tmp_path)
    tensors = load_file(ckpt / "model.safetensors")
    tensors["lm_head.weight"] = tensors.pop("embed_out.weight")  # transformers 5's name in memory
    save_file(tensors, ckpt / "model.safetensors")
    ours, published = Pythia.from_pretrained(ckpt), Pythia.from_pretrained(tiny_checkpoint)
    assert torch.equal(ours.embed_out.weight, published.embed_out.weight)


# --- result folders -------------------------------------------------------------------------------------------


def test_an_unusable_out_is_found_before_the_model_loads(tiny_checkpoint, book, tmp_path, capsys, monkeypatch):
    def never(*args, **kwargs):
        raise AssertionError("the model was loaded before --out was checked")

    monkeypatch.setattr("eval.pipeline.load_for_inference", never)
    (tmp_path / "a-file").write_text("")
    argv = ["ppl", "--model", str(tiny_checkpoint), "--data", str(book), "--out", str(tmp_path / "a-file")]
    assert run_cli(eval_cli.main, argv) == 2
    one_line_error(capsys, "is a file, not a folder")


def test_a_second_run_into_a_busy_folder_is_refused(tiny_checkpoint, book, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    holder = subprocess.Popen([sys.executable, "-c", textwrap.dedent(f"""
        import sys
        from filelock import FileLock
        lock = FileLock({str(out / '.lock')!r})
        lock.acquire()
        print("held", flush=True)
        sys.stdin.read()
    """)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        argv = ["ppl", "--model", str(tiny_checkpoint), "--data", str(book), "--out", str(out)]
        assert run_cli(eval_cli.main, argv) == 2
        one_line_error(capsys, "another run is writing into", "give another --out")
        assert run_cli(eval_cli.main, ["report", str(out)]) == 2
    finally:
        holder.communicate("")
    assert run_cli(eval_cli.main, argv) == 0  # free again


def test_a_sweep_of_other_policies_into_a_folder_keeps_the_earlier_ones(tiny_checkpoint, book, tmp_path):
    out = tmp_path / "out"
    common = f"model: {tiny_checkpoint}\ndata: {book}\nctx_len: 32\nmax_tokens: 100\n"
    (tmp_path / "a.yaml").write_text(common + "policies: [{compressor: none}, {compressor: knorm}]\n")
    (tmp_path / "b.yaml").write_text(common + "policies: [{compressor: tova, max_capacity_prompt: 8}]\n")
    for config in ("a.yaml", "b.yaml"):
        assert run_cli(eval_cli.main, ["sweep", str(tmp_path / config), "--out", str(out)]) == 0
    held = [c["label"] for c in json.loads((out / "sweep.json").read_text())["configs"]]
    assert held == ["none", "knorm_r0.5", "tova_c8"]
    report = (out / "report.md").read_text()
    assert all(f"| {label} | 1 |" in report for label in held)


# --- the cache ------------------------------------------------------------------------------------------------


def test_reset_makes_a_used_cache_a_fresh_one(tiny_checkpoint):
    model = Pythia.from_pretrained(tiny_checkpoint).for_inference()
    first, second = torch.randint(0, 100, (1, 30)), torch.randint(0, 100, (1, 25))
    cache = model.new_cache(1, SnapKV(window_size=4, max_capacity_prompt=16))
    with torch.inference_mode():
        model(first, cache=cache)
        cache.reset()
        reused = model(second, cache=cache)
        fresh_cache = model.new_cache(1, SnapKV(window_size=4, max_capacity_prompt=16))
        fresh = model(second, cache=fresh_cache)
    assert torch.equal(reused, fresh) and cache.seen == 25 and len(cache) == 16
    assert torch.equal(cache.positions(0), fresh_cache.positions(0))
    with pytest.raises(ValueError, match="batch_size must be a positive integer"):
        KVCache(model.config, batch_size=0)


def test_sampling_options_that_do_nothing_are_errors(tiny_checkpoint, capsys):
    model = Pythia.from_pretrained(tiny_checkpoint).for_inference()
    with pytest.raises(ValueError, match="temperature 0"):
        generate(model, [1, 2], max_new_tokens=2, top_k=5)
    assert generate_cli(tiny_checkpoint, "--top-p", "0.9") == 2
    one_line_error(capsys, "give a temperature > 0")
    assert math.isfinite(generate(model, [1, 2], max_new_tokens=4, temperature=0.7, top_k=5, seed=1).ttft_s)


@pytest.mark.parametrize("extra,fragment", [
    (["--revision", "step1000"], "leave --revision out"),
    (["--decode-interval", "4"], "--compressor none never does"),
    (["--seed", "3"], "give a temperature > 0"),
    (["--compressor", "knorm", "--max-capacity-prompt", "64"], "--max-capacity-prompt does nothing with --compressor knorm"),
    (["--compressor", "knorm", "--skip-layers", "0,9"], "skip_layers [9] are not layers of this model"),
    (["--compressor", "snapkv", "--max-capacity-prompt", "1.5"], "takes an int"),
])
def test_options_that_would_do_nothing_or_cannot_fit_are_errors(tiny_checkpoint, capsys, monkeypatch, extra,
                                                                fragment):
    import importlib

    generate_cli_module = importlib.import_module("minipythia.generate.__main__")

    def never(*args, **kwargs):
        raise AssertionError("the weights were loaded before the options were checked")

    monkeypatch.setattr(generate_cli_module, "load_for_inference", never)
    assert generate_cli(tiny_checkpoint, *extra) == 2
    one_line_error(capsys, fragment)


def test_an_output_path_in_the_way_is_one_line(tmp_path, capsys):
    from minipythia.random_checkpoint import main as random_main

    (tmp_path / "taken").write_text("")
    assert run_cli(random_main, ["14m", str(tmp_path / "taken")]) == 2
    one_line_error(capsys, "taken")


def test_api_arguments_of_the_wrong_kind_are_named(tiny_checkpoint):
    model = Pythia.from_pretrained(tiny_checkpoint, dtype="bfloat16")  # a dtype by name works as by torch dtype
    assert model.embed_in.weight.dtype == torch.bfloat16
    with pytest.raises(ValueError, match="dtype must be one of float32, bfloat16"):
        Pythia.from_pretrained(tiny_checkpoint, dtype="int8")
    with pytest.raises(TypeError, match="compressor must be a minipythia Compressor"):
        model.new_cache(1, "snapkv")
    with pytest.raises(ValueError, match="decode_interval must be an integer"):
        model.new_cache(1, SnapKV(window_size=4, max_capacity_prompt=16), decode_interval=2.5)
    with pytest.raises(ValueError, match="max_new_tokens must be an integer"):
        generate(model, [1, 2], max_new_tokens=2.0)


def test_a_missing_tokenizer_path_is_not_taken_for_a_hub_id(tiny_checkpoint, book, tmp_path, capsys):
    from minipythia.weights import ModelNotFoundError, resolve

    argv = ["ppl", "--model", str(tiny_checkpoint), "--data", str(book), "--tokenizer", str(tmp_path / "nope.json"),
            "--out", str(tmp_path / "out")]
    assert run_cli(eval_cli.main, argv) == 2
    one_line_error(capsys, "nope.json", "neither an existing checkpoint directory nor a hub id")
    with pytest.raises(ModelNotFoundError, match="not in the Hugging Face cache"):  # a name with a dot stays a name
        resolve("pythia-1.4b")
