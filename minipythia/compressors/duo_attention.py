import json
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch

from ..rotary import rotary_cos_sin
from .base import Compressor
from .registry import register


def unrotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """The inverse of the model's rotary ("rotate half" on the first nd features): x (..., T, hs) rotated at
    the positions of cos, sin (T, nd) -> x as it was before the rotation (a rotation by minus the angle)."""
    nd = cos.size(-1)
    x_rot, x_pass = x[..., :nd], x[..., nd:]
    x1, x2 = x_rot.chunk(2, dim=-1)
    rotated = torch.cat((-x2, x1), dim=-1)
    return torch.cat((x_rot * cos - rotated * sin, x_pass), dim=-1)


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """The model's rotary, out of place: x (..., T, hs), cos, sin (T, nd)."""
    nd = cos.size(-1)
    x_rot, x_pass = x[..., :nd], x[..., nd:]
    x1, x2 = x_rot.chunk(2, dim=-1)
    rotated = torch.cat((-x2, x1), dim=-1)
    return torch.cat((x_rot * cos + rotated * sin, x_pass), dim=-1)


@register
@dataclass
class DuoAttention(Compressor):
    """DuoAttention, retrieval and streaming heads (Xiao et al. 2024, "DuoAttention: Efficient Long-Context
    LLM Inference with Retrieval and Streaming Heads", arXiv 2410.10819; mit-han-lab/duo-attention), as in
    NVIDIA kvpress `kvpress/presses/duo_attention_press.py` (DuoAttentionPress with on_the_fly_scoring=True).

    Each head is either a retrieval head, which keeps every entry of the prompt, or a streaming head, which
    keeps the first `sink_size` (the attention sinks) and the last `recent_size` entries only (all of them
    when the prompt has at most sink_size + recent_size tokens). The heads of lowest head score stream, the
    others retrieve: with head_ranking = "model" (the official code's and kvpress's), the round(layers * nh *
    head_compression_ratio) lowest of the whole model, so that layers stream different numbers of heads; with
    "layer", the round(nh * head_compression_ratio) lowest of each layer. Ties: the lower layer, then the
    lower head, first.

    The head score is kvpress's on-the-fly one (`duo_attention_on_the_fly`): take the layer's mean query and
    mean key before rotary, repeat each `pattern_length` times and rotate them at positions 0 ..
    pattern_length - 1; softmax-attend with the last query over those keys, and score the head by the
    area under the cumulated attention curve, mean_j sum_{i <= j} a_i. Because the query and keys are the
    same vector at every position, the attention depends only on the distance: a head that attends to
    nearby tokens has its mass at the end of the curve and scores near 0 (it streams first), one that
    attends far back scores near 1.

    Deviations, deliberate: kvpress averages the queries and keys over 50 BookSum samples once per model;
    here the means are over the prompt itself (its queries and keys, un-rotated from their positions
    0 .. L-1), per batch row. A layer's cache is set right after its own attention, before the later layers
    exist, so on the fly the model-wide ranking needs every layer's scores first: `prepare` asks for the
    prompt's uncompressed prefill (prompt.prefill, which the model then fills the cache from: the prompt
    still runs once) and ranks from it; "layer" ranking scores each layer as it comes. kvpress's defaults
    on the fly are sink_size 128, recent_size 256 (kept here) and head_compression_ratio 0 (here 0.5, 0
    keeping everything). kvpress masks the streaming heads' middle entries at attention time; here they are
    evicted (a ragged cache, minipythia.ragged_cache).

    Calibrated patterns: `pattern_file`, written by `python -m eval.calibrate_duo` from a few books (the
    same score averaged over their prompts, per layer and head), replaces the prompt's own scores. It is not
    DuoAttention's own calibration (gate values trained per head on synthetic retrieval data,
    `full_attention_heads.tsv`, thresholded at a sparsity quantile over all heads), which is not built
    here. Head-wise budgets are set once, at the prefill: it does
    not compress during decoding.

    `keep_count(layer, L)` is the average per head of the heads ranked together (the model's, or the
    layer's): (n_s * min(L, sink_size + recent_size) + (N - n_s) * L) // N, N those heads, n_s =
    round(N * head_compression_ratio) the streaming ones; with model-wide ranking a layer's real counts are
    the cache's (`lengths`).
    """

    name = "duo_attention"
    label_names = {"head_compression_ratio": "hr", "sink_size": "sink", "recent_size": "rec",
                   "pattern_length": "q", "head_ranking": "by", "pattern_file": "pattern"}
    cannot_decode = ("its streaming and retrieval heads are chosen once, at the prefill, and a streaming head's "
                     "window is a prompt's")
    headwise = True
    head_compression_ratio: float = 0.5  # the share of heads that stream
    sink_size: int = 128  # kvpress's on-the-fly default
    recent_size: int = 256  # kvpress's on-the-fly default
    pattern_length: int = 500  # kvpress's q_len: the positions of the repeated mean query and key
    head_ranking: Literal["model", "layer"] = "model"  # which heads compete for streaming: kvpress's is the model
    # A calibrated head pattern (python -m eval.calibrate_duo): its per-head scores replace the prompt's own.
    pattern_file: str | None = None

    def validate(self):
        if not 0.0 <= self.head_compression_ratio <= 1.0:
            raise ValueError(f"head_compression_ratio must be in [0, 1] (the share of heads that stream), got "
                             f"{self.head_compression_ratio}")
        if self.sink_size < 0:
            raise ValueError(f"sink_size must be >= 0, got {self.sink_size}")
        if self.recent_size < 1:
            raise ValueError(f"recent_size must be >= 1, got {self.recent_size}")
        if self.pattern_length < 1:
            raise ValueError(f"pattern_length must be >= 1, got {self.pattern_length}")
        self._calibrated = read_pattern(self.pattern_file) if self.pattern_file else None
        super().validate()

    def for_model(self, config):
        self._config = config
        self._streaming = None  # (B or 1, layers, nh), which heads stream, with model-wide ranking
        if self._calibrated is not None:
            shape = (config.num_hidden_layers, config.num_attention_heads)
            if tuple(self._calibrated.shape) != shape:
                raise ValueError(f"{self.pattern_file} holds head scores of shape {tuple(self._calibrated.shape)}, "
                                 f"not this model's (layers, heads) = {shape}; calibrate it for this model")
            if self.head_ranking == "model":
                self._streaming = self.lowest_heads(self._calibrated[None])

    def ranked_heads(self) -> int:
        """How many heads compete for streaming: the model's, or a layer's."""
        config = getattr(self, "_config", None)
        if config is None:
            raise ValueError("duo_attention needs the model's config (for_model) to count its heads")
        nh = config.num_attention_heads
        return nh * config.num_hidden_layers if self.head_ranking == "model" else nh

    def lowest_heads(self, scores: torch.Tensor) -> torch.Tensor:
        """Head scores (B, ...) -> BoolTensor (B, ...): the round(N * head_compression_ratio) lowest of each batch
        row's N heads stream, ties to the earlier (lower layer, then lower head)."""
        flat = scores.reshape(scores.size(0), -1)
        n_s = round(flat.size(1) * self.head_compression_ratio)
        streaming = torch.zeros_like(flat, dtype=torch.bool)
        streaming.scatter_(-1, flat.argsort(dim=-1, stable=True)[:, :n_s], True)
        return streaming.reshape(scores.shape)

    def keep_count(self, layer, seq_len):
        N = self.ranked_heads()
        n_s = round(N * self.head_compression_ratio)
        window = min(seq_len, self.sink_size + self.recent_size)
        return (n_s * window + (N - n_s) * seq_len) // N

    def prepare(self, model, prompt):
        """Model-wide ranking on the fly: every layer's head scores, from the prompt's uncompressed prefill."""
        if self.head_ranking != "model" or self._calibrated is not None:
            return
        self._streaming = None
        if self.keep_count(0, prompt.length) >= prompt.length:
            return  # nothing will be evicted: no scores needed
        prefill = prompt.prefill
        scores = torch.stack([self.head_scores(k, q) for k, q in zip(prefill.keys, prefill.queries)], dim=1)
        self._streaming = self.lowest_heads(scores)  # (B, layers, nh)

    def head_scores(self, keys: torch.Tensor, queries: torch.Tensor) -> torch.Tensor:
        """keys, queries (B, nh, L, hs), rotated at positions 0 .. L-1 -> kvpress's on-the-fly score (B, nh)."""

        config = self._config
        L, hs = keys.size(2), keys.size(3)
        cos, sin = rotary_cos_sin(config, 0, L, keys.device, torch.float32)
        q = unrotate(queries[:, :, -L:].float(), cos, sin).mean(dim=2, keepdim=True)  # (B, nh, 1, hs)
        k = unrotate(keys.float(), cos, sin).mean(dim=2, keepdim=True)
        n = self.pattern_length
        cos, sin = rotary_cos_sin(config, 0, n, keys.device, torch.float32)
        q_last = rotate(q, cos[-1:], sin[-1:])  # the mean query at position n - 1
        k_all = rotate(k.expand(-1, -1, n, -1), cos, sin)  # the mean key at positions 0 .. n - 1
        attn = (q_last @ k_all.transpose(-1, -2) / hs ** 0.5).softmax(dim=-1)[:, :, 0]  # (B, nh, n)
        return attn.cumsum(dim=-1).mean(dim=-1)

    def score(self, layer, keys, values, queries):
        """Every entry of a head scores its head's score (select reads one per head): the calibrated one when
        a pattern_file is given, else the prompt's own."""
        if self._calibrated is not None:
            heads = self._calibrated[layer].to(keys.device)[None].expand(keys.size(0), -1)  # (B, nh)
        else:
            heads = self.head_scores(keys, queries)
        return heads[..., None].expand(keys.shape[:3])

    def select(self, layer, scores, keep):
        B, H, L = scores.shape
        if self.head_ranking == "layer":
            streaming = self.lowest_heads(scores[..., 0])
        else:
            ranked = getattr(self, "_streaming", None)
            if ranked is None or ranked.size(0) not in (1, B):
                raise ValueError("duo_attention ranks heads over the whole model from every layer's scores: "
                                 "prepare(model, Prompt(model, ids)) computes them before a prefill "
                                 "(model(ids, cache=...) and Prefill.replay call it), or use head_ranking='layer'")
            streaming = ranked[:, layer].to(scores.device).expand(B, H)
        pos = torch.arange(L, device=scores.device)
        window = (pos < self.sink_size) | (pos >= L - self.recent_size)  # (L,)
        return ~streaming[..., None] | window


def read_pattern(path: str) -> torch.Tensor:
    """The per-(layer, head) scores of a calibration file (eval.calibrate_duo), (layers, heads) float64."""
    try:
        scores = json.loads(Path(path).read_text())["scores"]
        return torch.tensor(scores, dtype=torch.float64)
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ValueError(f"cannot read the head pattern {path!r} ({type(e).__name__}: {e}); write one with "
                         f"python -m eval.calibrate_duo") from None
