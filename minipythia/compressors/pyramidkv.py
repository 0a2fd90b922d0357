from dataclasses import dataclass

from .snapkv import SnapKV


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

    The budget needs the model's depth, which keep_count(layer, seq_len) is not told: `num_layers` is a
    setting the caller gives (model.config.num_hidden_layers; the CLI reads it from the checkpoint).
    """

    name = "pyramidkv"
    beta: int = 20
    num_layers: int | None = None

    def __post_init__(self):
        super().__post_init__()
        if self.beta < 1:
            raise ValueError(f"beta must be >= 1, got {self.beta}")
        if self.num_layers is None or self.num_layers < 1:
            raise ValueError(f"num_layers must be the model's number of layers (model.config.num_hidden_layers), "
                             f"got {self.num_layers}")

    def keep_count(self, layer, seq_len):
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
