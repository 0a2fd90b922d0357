from dataclasses import dataclass

import torch

from .base import CapacityBudget, Compressor
from .over_scorer import OverScorer
from .registry import register
from .settings import Policy


def adaptive_selection(scores: torch.Tensor, keep: int, alpha_safeguard: float) -> torch.Tensor:
    """Ada-KV's head-wise selection: scores (B, nh, L), keep the average budget per head -> BoolTensor
    (B, nh, L) of the kept entries. Each batch row keeps nh * keep entries of the layer in all (all of
    them when keep >= L): every head its own top int(keep * alpha_safeguard), then the best of the other
    entries, whichever head they belong to.

    Ties are broken by place (within a head the earlier entry, across heads the lower head first), so that
    the selection is deterministic; scores of +inf (a scorer's "always keep") are ordinary, top scores."""
    B, H, L = scores.shape
    if keep >= L:
        return torch.ones_like(scores, dtype=torch.bool)
    if keep <= 0:
        return torch.zeros_like(scores, dtype=torch.bool)
    n_safe = int(keep * alpha_safeguard)
    safe = torch.zeros_like(scores, dtype=torch.bool)
    if n_safe > 0:
        own_order = scores.argsort(dim=-1, descending=True, stable=True)[..., :n_safe]
        safe.scatter_(-1, own_order, True)
    # One order over the layer's entries of each batch row: the safeguarded ones first, then the others,
    # each group by score (higher first). The layer keeps the first nh * keep of it.
    flat, flat_safe = scores.reshape(B, H * L), safe.reshape(B, H * L)
    order = flat.argsort(dim=-1, descending=True, stable=True)
    order = order.gather(-1, (~flat_safe).gather(-1, order).to(torch.uint8).argsort(dim=-1, stable=True))
    kept = torch.zeros_like(flat_safe).scatter_(-1, order[:, :H * keep], True)
    return kept.reshape(B, H, L)


@register
@dataclass
class AdaKV(OverScorer, CapacityBudget, Compressor):
    """Ada-KV, adaptive budget allocation across heads (Feng et al. 2024, "Ada-KV: Optimizing KV Cache
    Eviction by Adaptive Budget Allocation for Efficient LLM Inference", arXiv 2407.11550), as in NVIDIA
    kvpress `kvpress/presses/adakv_press.py` (AdaKVPress, over a ScorerPress).

    Another policy, the `scorer`, scores every entry of every head. The heads of a layer then share one
    budget instead of each keeping the same number: per batch row the layer keeps nh * C entries in all
    (C = max_capacity_prompt, the average per head; a prompt of at most C tokens stays whole). Each head
    first keeps its own top int(C * alpha_safeguard) entries (the safeguard); the rest of the layer's
    budget goes to the highest of the remaining scores, whichever heads they belong to. A head whose
    scores are spread out thus keeps more entries than one that concentrates on a few. alpha_safeguard = 1
    is the scorer's own uniform per-head selection; alpha_safeguard = 0 a plain top-k over the layer.
    The selection is `select`; `score` is the scorer's, unchanged.

    The official repository (FFY0/AdaKV, `adaptive_snapkv/monkeypatch/snapkv_utils.py`,
    AdaptiveSnapKVCluster, its floor_alpha) allocates in two steps instead: it counts each head's share
    c_h of a top-(nh * B) over the layer, then keeps round(c_h * (1 - alpha) + int(B * alpha)) of that
    head's best entries, B the per-head budget without SnapKV's window, which every head keeps besides.
    The heads' totals then need not add up to nh * B exactly. Here, as in kvpress, the safeguard is set
    aside first and the layer's total is exact; scorers that always keep some entries (SnapKV's window,
    scored +inf) have them counted in the budget, and kept by every head, as kvpress does.

    Deviations, deliberate: a capacity budget C per head on average instead of kvpress's
    compression_ratio (its n_kept = int(L * (1 - compression_ratio)) per head is C here, min(L, C));
    ties in the scores are broken by place, where kvpress leaves them to torch.topk. The safeguard is
    int(C * alpha_safeguard) as in kvpress. Head-wise budgets are set once, at the prefill: Ada-KV does
    not compress during decoding here.

    Limitation: the scorer is built with its defaults, plus max_capacity_prompt = C when it has that
    setting (which it then shares; its other settings cannot be set through AdaKV). It is `inner`, a plain
    attribute; the model's config (for_model), the prompt hook and the missing input are the scorer's.
    Scorers that choose head-wise themselves, prune key channels or set their kept values are refused.
    """

    name = "adakv"
    label_names = {"scorer": "", "alpha_safeguard": "a"}
    cannot_decode = ("its head-wise budgets are set once, at the prefill; use its scorer alone to compress "
                     "during decoding")
    headwise = True
    max_capacity_prompt: int = 512
    scorer: Policy = "snapkv"
    alpha_safeguard: float = 0.2  # kvpress's default; the share of C each head keeps of its own best

    def validate(self):
        super().validate()
        if not 0.0 <= self.alpha_safeguard <= 1.0:
            raise ValueError(f"alpha_safeguard must be in [0, 1] (the share of the per-head budget each head "
                             f"keeps of its own best entries), got {self.alpha_safeguard}")

    def score(self, layer, keys, values, queries):
        return self.inner.score(layer, keys, values, queries)

    def select(self, layer, scores, keep):
        return adaptive_selection(scores, keep, self.alpha_safeguard)
