import torch
from minipythia import Pythia, Tokenizer


def test_tiny_checkpoint_loads_and_matches(tiny_hf_and_checkpoint):
    hf, ckpt = tiny_hf_and_checkpoint
    model = Pythia.from_pretrained(ckpt)
    ids = torch.randint(0, 512, (1, 20))
    with torch.no_grad():
        assert (model(ids) - hf(ids).logits).abs().max() < 1e-4
    tok = Tokenizer.from_pretrained(ckpt)
    assert tok.decode(tok.encode("the quick brown fox.")) == "the quick brown fox."
