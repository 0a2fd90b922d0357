import math
from dataclasses import dataclass

import torch

from .adakv import AdaKV
from .base import CapacityBudget, Compressor
from .none import NoCompression
from .over_scorer import OverScorer
from .registry import register
from .settings import Policy


@register
@dataclass
class CriticalKV(OverScorer, CapacityBudget, Compressor):
    """CriticalKV (Feng et al. 2025, "Identify Critical KV Cache in LLM Inference from an Output Perturbation
    Perspective", arXiv 2502.03805), as in NVIDIA kvpress `kvpress/presses/criticalkv_press.py`,
    CriticalKVPress (the authors' own code, FFY0/AdaKV, contributed it there).

    A two-stage selection over another policy, the `scorer`, per (batch, head), with a budget of
    C = max_capacity_prompt entries:
    1. the int(C * first_stage_ratio) entries the scorer ranks best are kept outright;
    2. every entry is rescored as (s + epsilon) * ||v W_o^h||_1, s its scorer score, v its value and W_o^h
       the head's (hs, hidden) block of the layer's output projection (the rows of W_o^T that head feeds,
       i.e. the columns h*hs:(h+1)*hs of `attention.dense.weight`, no bias): the L1 norm of what the entry's
       value adds to the layer's output through this head, a bound on the output perturbation its eviction
       causes. The other C - int(C * first_stage_ratio) kept entries are the best of the rest by that score.
    `score` returns the stage-2 scores with the stage-1 entries set to +inf, so the cache's top-C per head
    is that selection. first_stage_ratio = 1 is the scorer's own selection; 0 ranks by stage 2 alone.
    As in kvpress, a negative scorer score (knorm's -||k||) is made worse by a larger projected norm.

    W_o is read in `prepare` (called with the model before each prefill and replay), layer by layer.

    Deviations, deliberate:
    - kvpress's budget is a compression ratio: n_kept = int(L * (1 - ratio)) and the first stage keeps
      int((1 - ratio) * L * first_stage_ratio); here it is a capacity C per head (prompts with L <= C stay
      whole) and the first stage keeps int(C * first_stage_ratio), the same number when C = L * (1 - ratio)
      up to float rounding of the product.
    - kvpress marks the first stage with the dtype's largest finite value, below +inf; here it is +inf, so
      a scorer that gives +inf to entries it always keeps (our snapkv's window) keeps them whichever stage
      they fall in. kvpress's SnapKV gives its window finite scores, so the two agree there.
    - The projected norm is computed in float32 (kvpress: in the model's dtype), the product in the wider
      of float32 and the scorer's dtype. kvpress averages the norm over the query heads sharing a KV head
      (GQA); Pythia has one query head per KV head, so there is nothing to average.
    - Prefill only (as kvpress's press): it cannot compress during decoding.

    Limitation: the scorer is built with its defaults, plus max_capacity_prompt = C when it has that setting
    (OverScorer); it is `inner`. CriticalAdaKV is AdaKV over this policy (scorer "criticalkv").
    """

    name = "criticalkv"
    label_names = {"scorer": "", "first_stage_ratio": "fs", "epsilon": "eps"}
    cannot_decode = ("its refinement splits a prompt's budget between the scorer's choice and the projected value "
                     "norms once, at the prefill, as the official press does")
    max_capacity_prompt: int = 512
    scorer: Policy = "snapkv"
    first_stage_ratio: float = 0.5  # kvpress's default
    epsilon: float = 1e-4  # kvpress's default

    def validate(self):
        super().validate()
        if not 0.0 <= self.first_stage_ratio <= 1.0:
            raise ValueError(f"first_stage_ratio must be in [0, 1] (the fraction of the budget the scorer chooses "
                             f"alone), got {self.first_stage_ratio}")
        if not (math.isfinite(self.epsilon) and self.epsilon >= 0):
            raise ValueError(f"epsilon must be a finite number >= 0, got {self.epsilon}")

    def refused_scorer(self, cls):
        if issubclass(cls, NoCompression):
            return "it keeps every entry and scores none"
        if cls.headwise:
            return "it gives heads budgets of their own; use adakv with scorer 'criticalkv' for CriticalAdaKV"
        if cls.prunes_key_channels:
            return "it prunes key channels"
        if cls.kept_values is not Compressor.kept_values:
            return "it sets its kept entries' values itself"
        return None

    def prepare(self, model, input_ids):
        super().prepare(model, input_ids)
        # dense(y) = y @ W^T: W^T (hidden_in, hidden_out), whose rows h*hs:(h+1)*hs are head h's W_o^h.
        self.output_projections = [block.attention.dense.weight.detach().t() for block in model.layers]

    def projected_norm(self, layer: int, values: torch.Tensor) -> torch.Tensor:
        """||v W_o^h||_1 for every entry, float32 (B, nh, L), from values (B, nh, L, hs)."""
        weights = getattr(self, "output_projections", None)
        if weights is None:
            raise ValueError("criticalkv needs the model's output projections: prepare(model, input_ids) is called "
                             "before a prefill (model(ids, cache=...) or Prefill.replay do it)")
        B, H, L, hs = values.shape
        w = weights[layer].to(device=values.device, dtype=torch.float32)
        if w.size(0) != H * hs:
            raise ValueError(f"layer {layer}'s output projection takes {w.size(0)} inputs, not {H} heads x {hs}")
        w = w.reshape(H, hs, w.size(1))
        # One head at a time (as kvpress): (B, L, hidden) at once, not (B, nh, L, hidden).
        return torch.stack([(values[:, h].float() @ w[h]).abs().sum(dim=-1) for h in range(H)], dim=1)

    def score(self, layer, keys, values, queries):
        scores = self.inner.score(layer, keys, values, queries)  # (B, nh, L)
        first = int(self.keep_count(layer, keys.size(2)) * self.first_stage_ratio)
        dtype = torch.promote_types(scores.dtype, torch.float32)
        refined = (scores.to(dtype) + self.epsilon) * self.projected_norm(layer, values).to(dtype)
        if first > 0:
            chosen = scores.topk(first, dim=-1).indices
            refined.scatter_(-1, chosen, float("inf"))
        return refined


@register
@dataclass
class CriticalAdaKV(AdaKV):
    """CriticalAdaKV (Feng et al. 2025; kvpress `CriticalAdaKVPress`): AdaKV's head-wise budgets over
    CriticalKV's scores, i.e. `AdaKV(scorer="criticalkv")` under its own name."""

    name = "criticaladakv"
    scorer: Policy = "criticalkv"
