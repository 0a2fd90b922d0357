from dataclasses import dataclass

from .base import Compressor
from .registry import register
from .snapkv import SnapKV


@register
@dataclass
class PyramidKV(SnapKV):
    """PyramidKV (Cai et al. 2024, "PyramidKV: Dynamic KV Cache Compression based on Pyramidal Information
    Funneling"), as in Zefan-Cai/PyramidKV `pyramidkv_utils.py`, PyramidKVCluster.update_kv.

    SnapKV's scores (inherited: the last W queries vote, pooled; the window always kept) with a per-layer
    budget that shrinks linearly from the bottom layer to the top one. With C = max_capacity_prompt,
    W = window_size, n = num_layers, a prompt of L tokens and `//` floor division as in the official code:

        min_num = (C - W) // beta
        max_num = 2 * (C - W) - min_num
        if max_num >= L - W:                  # the bottom layer cannot keep more than the L - W prefix
            max_num = L - W
            min_num = 2 * (C - W) - max_num
        steps = (max_num - min_num) // (n - 1)
        kept(layer) = L                                 if L < C           (the prompt stays whole)
                      C                                 if L < 2 * (C - W) (plain SnapKV, every layer)
                      W + max_num - layer * steps       otherwise

    The prefix budgets run from max_num down to about min_num and average to C - W (a little more, by at
    most (n - 1) / 2, because `steps` is floored), so the layers keep C entries on average. With n = 1 the
    official code would divide by zero; here the single layer keeps C (plain SnapKV). Kept from the
    official code: when max_num - min_num < n - 1, `steps` floors to 0 and every layer keeps W + max_num.

    The budget needs the model's depth: `num_layers`, filled from the model's config by for_model (the
    cache calls it) when left out.
    """

    name = "pyramidkv"
    label_names = {"num_layers": "layers"}
    cannot_decode = ("PyramidKV's per-layer budgets are computed from the prompt's length, which a stream of decoded "
                     "tokens does not have")
    beta: int = 20
    num_layers: int | None = None

    def validate(self):
        super().validate()
        if self.beta < 1:
            raise ValueError(f"beta must be >= 1, got {self.beta}")
        if self.num_layers is not None and self.num_layers < 1:
            raise ValueError(f"num_layers must be the model's number of layers (model.config.num_hidden_layers), "
                             f"got {self.num_layers}")

    decode_queries = Compressor.decode_queries  # refused (cannot_decode), although SnapKV is not

    def for_model(self, config):
        if self.num_layers is None:
            self.num_layers = config.num_hidden_layers
        elif self.num_layers != config.num_hidden_layers:
            raise ValueError(f"num_layers is {self.num_layers} but the model has {config.num_hidden_layers} layers; "
                             f"leave num_layers out to use the model's")

    def keep_count(self, layer, seq_len):
        if self.num_layers is None:
            raise ValueError("PyramidKV's budgets need the model's depth: use it through a model's cache, or call "
                             "for_model(model.config) first")
        C, W = self.max_capacity_prompt, self.window_size
        if seq_len < C:
            return seq_len
        if seq_len < 2 * (C - W) or self.num_layers == 1:
            return C
        min_num = (C - W) // self.beta
        max_num = 2 * (C - W) - min_num
        if max_num >= seq_len - W:
            max_num = seq_len - W
            min_num = 2 * (C - W) - max_num
        steps = (max_num - min_num) // (self.num_layers - 1)
        return W + max_num - layer * steps
