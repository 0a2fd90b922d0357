from dataclasses import dataclass

import torch

from .base import CapacityBudget, Compressor
from .over_scorer import OverScorer
from .registry import register
from .settings import Policy


@register
@dataclass
class ChunkKV(OverScorer, CapacityBudget, Compressor):
    """ChunkKV (Liu et al. 2025, "ChunkKV: Semantic-Preserving KV Cache Compression for Efficient
    Long-Context LLM Inference"), as in NVIDIA kvpress `kvpress/presses/chunkkv_press.py`, ChunkKVPress.

    Keeps whole contiguous chunks of `chunk_size` entries instead of single entries. Another policy, the
    `scorer`, scores every entry; as in kvpress, a chunk's score is the mean over its entries of the scores
    summed over the heads, so every head of a layer keeps the same chunks; the last L % chunk_size entries
    form a shorter chunk of their own, scored by their mean too. The best chunks are kept. A prompt shorter
    than one chunk is left to the scorer alone (kvpress delegates to the scorer's own selection then).

    Deviations, deliberate: kvpress keeps int(n_chunks * (1 - compression_ratio)) whole chunks (at least
    one), so how many entries it keeps depends on whether the short chunk is among them; here every head
    keeps exactly max_capacity_prompt = C entries: the best chunks in order while they fit whole, then the
    best entries (by the head-summed score) of the next chunk. When the kept chunks add up to C the two
    agree. kvpress gives every sequence of a batch the chunks chosen for the first one; here each sequence
    chooses its own. Prompts with L <= C stay whole.

    Limitation: the scorer is built with its defaults, plus max_capacity_prompt = C when it has that
    setting (its window, kernel, ... cannot be set through ChunkKV). It is `inner`, a plain attribute; the
    model's config (for_model) and the decode-time query count (decode_queries) are the scorer's.
    """

    name = "chunkkv"
    label_names = {"chunk_size": "chunk", "scorer": ""}
    max_capacity_prompt: int = 512
    chunk_size: int = 20  # kvpress's chunk_length default (the paper's experiments mostly use 10)
    scorer: Policy = "snapkv"

    def validate(self):
        super().validate()
        if self.chunk_size < 1:
            raise ValueError(f"chunk_size must be >= 1, got {self.chunk_size}")

    def decode_queries(self):
        return self.scorer_decode_queries()

    def score(self, layer, keys, values, queries):
        scores = self.inner.score(layer, keys, values, queries)  # (B, nh, L)
        B, H, L = scores.shape
        size = self.chunk_size
        if L < size:  # no whole chunk: the scorer's own per-head selection, as kvpress
            return scores
        total = scores.double().sum(dim=1)  # (B, L): the heads choose together
        chunk_of = torch.arange(L, device=scores.device) // size  # the last, short chunk is one too
        n_chunks = (L + size - 1) // size
        sums = total.new_zeros(B, n_chunks).index_add_(1, chunk_of, total)
        means = sums / torch.bincount(chunk_of, minlength=n_chunks)  # (B, n_chunks)
        # The rank of each chunk (0 = best), then the entries in one order: by their chunk's rank, and
        # within a chunk by their own score. The top C of that order are the best whole chunks, then the
        # best entries of the next chunk; each entry's score is its place in the order (higher = earlier).
        chunk_rank = means.argsort(dim=-1, descending=True, stable=True).argsort(dim=-1)
        order = total.argsort(dim=-1, descending=True, stable=True)  # within a chunk
        order = order.gather(-1, chunk_rank.gather(-1, chunk_of[order]).argsort(dim=-1, stable=True))
        place = torch.arange(L, 0, -1, device=scores.device, dtype=torch.float64).expand(B, L)
        ranked = torch.empty_like(place).scatter_(-1, order, place)
        return ranked[:, None].expand(B, H, L)
