"""python -m minipythia.random_checkpoint: a published shape with random weights, loadable by both sides."""

import torch

from minipythia import Pythia
from minipythia.cli import run_cli
from minipythia.config import PYTHIA_SHAPES
from minipythia.random_checkpoint import main


def test_writes_a_checkpoint_transformers_and_minipythia_agree_on(tmp_path):
    from transformers import GPTNeoXForCausalLM

    assert run_cli(main, ["pythia-14m", str(tmp_path / "ckpt"), "--seed", "3"]) == 0
    ours = Pythia.from_pretrained(tmp_path / "ckpt")
    layers, hidden, heads = PYTHIA_SHAPES["14m"]
    c = ours.config
    assert (c.num_hidden_layers, c.hidden_size, c.num_attention_heads, c.rotary_pct) == (layers, hidden, heads, 0.25)
    hf = GPTNeoXForCausalLM.from_pretrained(tmp_path / "ckpt", dtype=torch.float32).eval()
    ids = torch.randint(0, c.vocab_size, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert (ours(ids) - hf(ids).logits).abs().max() < 1e-4


def test_same_seed_same_weights_and_bad_size(tmp_path, capsys):
    for name in ("a", "b"):
        assert run_cli(main, ["14m", str(tmp_path / name)]) == 0
    assert (tmp_path / "a" / "model.safetensors").read_bytes() == (tmp_path / "b" / "model.safetensors").read_bytes()
    assert run_cli(main, ["7m", str(tmp_path / "c")]) == 2
    assert "unknown Pythia size" in capsys.readouterr().err
