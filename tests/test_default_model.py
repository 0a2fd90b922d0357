"""With no --model, the CLIs use Pythia-70M when it can be had and the embedded model otherwise."""

import pytest

import minipythia.cli as cli
import minipythia.weights as weights
from minipythia.weights import ModelNotFoundError


def test_falls_back_to_the_embedded_model_with_a_one_line_note(tiny_checkpoint, monkeypatch, capsys):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(cli, "DEFAULT_MODEL", "EleutherAI/not-cached-anywhere")
    monkeypatch.setattr(cli, "EMBEDDED_MODEL", tiny_checkpoint)
    choice = cli.resolve_model(None)
    assert choice.directory == tiny_checkpoint
    assert choice.name == f"weights/{tiny_checkpoint.name}"  # the reports name what was really used
    note = capsys.readouterr().err.strip()
    assert len(note.splitlines()) == 1 and "EleutherAI/not-cached-anywhere" in note and "embedded" in note


def test_prefers_pythia_when_it_is_available(tiny_checkpoint, tmp_path, monkeypatch, capsys):
    import shutil

    shutil.copytree(tiny_checkpoint, tmp_path / "pythia-70m-deduped")
    monkeypatch.setattr(weights, "WEIGHTS_DIR", tmp_path)  # as if `make download` had put it there
    choice = cli.resolve_model(None)
    assert choice.directory == tmp_path / "pythia-70m-deduped"
    assert choice.name == "EleutherAI/pythia-70m-deduped" and capsys.readouterr().err == ""


def test_an_explicit_model_never_falls_back(tiny_checkpoint, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(cli, "EMBEDDED_MODEL", tiny_checkpoint)
    with pytest.raises(ModelNotFoundError):
        cli.resolve_model("EleutherAI/not-cached-anywhere")


def test_without_the_embedded_model_the_hub_error_stands(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(cli, "DEFAULT_MODEL", "EleutherAI/not-cached-anywhere")
    monkeypatch.setattr(cli, "EMBEDDED_MODEL", tmp_path / "nothing")
    with pytest.raises(ModelNotFoundError, match="not-cached-anywhere"):
        cli.resolve_model(None)
