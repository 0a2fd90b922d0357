from dataclasses import dataclass

from .base import Compressor
from .registry import register


@register
@dataclass
class KnormPress(Compressor):
    """Keeps the keys with the lowest L2 norm, per head (Devoto et al. 2024; NVIDIA kvpress `KnormPress`).

    kvpress compresses every layer; the paper's variant leaves layers 0 and 1 whole (skip_layers=(0, 1)).
    """

    name = "knorm"
    label_names = {"compression_ratio": "r", "skip_layers": "skip"}
    cannot_decode = ("KnormPress keeps a fraction of whatever it is given, so it has no fixed budget: compressed at "
                     "every trigger, the cache would shrink until it holds at most about decode_interval / "
                     "compression_ratio entries, a size set by the interval, not by the policy")
    compression_ratio: float = 0.5
    skip_layers: tuple[int, ...] = ()

    def validate(self):
        if not 0.0 <= self.compression_ratio < 1.0:
            raise ValueError(f"compression_ratio must be in [0, 1) (fraction of entries evicted), got {self.compression_ratio}")

    def for_model(self, config):
        beyond = [layer for layer in self.skip_layers if not 0 <= layer < config.num_hidden_layers]
        if beyond:
            raise ValueError(f"skip_layers {beyond} are not layers of this model (0 .. {config.num_hidden_layers - 1})")

    def keep_count(self, layer, seq_len):
        if layer in self.skip_layers:
            return seq_len
        return max(1, int(seq_len * (1 - self.compression_ratio)))

    def score(self, layer, keys, values, queries):
        return -keys.float().norm(dim=-1)
