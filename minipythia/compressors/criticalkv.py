import math
from dataclasses import dataclass

import torch

from .adakv import AdaKV, adaptive_selection
from .base import CapacityBudget, Compressor
from .over_scorer import OverScorer
from .registry import register
from .settings import Policy
from .snapkv import SnapKV

# The largest (B, heads, L, hidden) float32 block of projected values computed at once: 4 MiB, which stays in
# cache (a 16 MiB block took 1.2x the time single-threaded); larger products go one head at a time.
PROJECTION_BLOCK = 2**20


class OutputProjectionNorms:
    """What CriticalKV's second stage weighs an entry by: ||v W_o^h||_1, v the entry's value and W_o^h its head's
    (hs, hidden) block of the layer's output projection (the columns h*hs:(h+1)*hs of `attention.dense.weight`,
    no bias): the L1 norm of what the value adds to the layer's output through this head, a bound on the output
    perturbation its eviction causes. W_o is read in `prepare`, which the model calls before each prefill and
    replay. Put it first among the bases (it chains prepare)."""

    epsilon: float
    inner: Compressor

    def prepare(self, model, prompt):
        super().prepare(model, prompt)
        # dense(y) = y @ W^T: W^T (hidden_in, hidden_out), whose rows h*hs:(h+1)*hs are head h's W_o^h.
        self.output_projections = [block.attention.dense.weight.detach().t() for block in model.layers]

    def projected_norm(self, layer: int, values: torch.Tensor) -> torch.Tensor:
        """||v W_o^h||_1 for every entry, float32 (B, nh, L), from values (B, nh, L, hs)."""
        weights = getattr(self, "output_projections", None)
        if weights is None:
            raise ValueError(f"{self.name} needs the model's output projections: prepare(model, Prompt(model, ids)) "
                             f"is called before a prefill (model(ids, cache=...) or Prefill.replay do it)")
        B, H, L, hs = values.shape
        w = weights[layer].to(device=values.device, dtype=torch.float32)
        if w.size(0) != H * hs:
            raise ValueError(f"layer {layer}'s output projection takes {w.size(0)} inputs, not {H} heads x {hs}")
        w = w.reshape(H, hs, w.size(1))
        # As many heads at a time as fit a (B, heads, L, hidden) block of PROJECTION_BLOCK elements (kvpress: one
        # head at a time): one batched product per block, not per head, the absolute values taken in place. The
        # same products and sums per head, so the same bits; fewer passes, each of which costs a thread wake-up.
        heads = max(1, PROJECTION_BLOCK // (B * L * w.size(2)))
        values = values.float()
        return torch.cat([(values[:, h : h + heads] @ w[h : h + heads]).abs_().sum(dim=-1) for h in range(0, H, heads)],
                         dim=1)

    def stage_two(self, layer: int, scores: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
        """(s + epsilon) * ||v W_o^h||_1 for the scorer's scores s (B, nh, L), in the wider of float32 and their
        dtype. The official CriticalKV adds epsilon to kvpress's scores; kvpress's SnapKV (and PyramidKV) average
        the window's votes where ours sum them (as the SnapKV authors' code does), so on our scale epsilon is
        window_size times larger. A score of +inf (the scorer's "always keep") stays +inf whatever the value's
        norm, where inf * 0 would be NaN."""
        epsilon = self.epsilon * self.inner.window_size if isinstance(self.inner, SnapKV) else self.epsilon
        dtype = torch.promote_types(scores.dtype, torch.float32)
        refined = (scores.to(dtype) + epsilon) * self.projected_norm(layer, values).to(dtype)
        return refined.masked_fill(scores == float("inf"), float("inf"))


@register
@dataclass
class CriticalKV(OutputProjectionNorms, OverScorer, CapacityBudget, Compressor):
    """CriticalKV (Feng et al. 2025, "Identify Critical KV Cache in LLM Inference from an Output Perturbation
    Perspective", arXiv 2502.03805), as in NVIDIA kvpress `kvpress/presses/criticalkv_press.py`,
    CriticalKVPress (the authors' own code, FFY0/AdaKV, contributed it there).

    A two-stage selection over another policy, the `scorer`, per (batch, head), with a budget of
    C = max_capacity_prompt entries:
    1. the int(C * first_stage_ratio) entries the scorer ranks best are kept outright;
    2. every entry is rescored as (s + epsilon) * ||v W_o^h||_1 (OutputProjectionNorms.stage_two), s its scorer
       score. The other C - int(C * first_stage_ratio) kept entries are the best of the rest by that score.
    `score` returns the stage-2 scores with the stage-1 entries set to +inf, so the cache's top-C per head
    is that selection. first_stage_ratio = 1 is the scorer's own selection; 0 ranks by stage 2 alone.
    As in kvpress, a negative scorer score (knorm's -||k||) is made worse by a larger projected norm.

    Deviations, deliberate:
    - kvpress's budget is a compression ratio: n_kept = int(L * (1 - ratio)) and the first stage keeps
      int((1 - ratio) * L * first_stage_ratio); here it is a capacity C per head (prompts with L <= C stay
      whole) and the first stage keeps int(C * first_stage_ratio), the same number when C = L * (1 - ratio)
      up to float rounding of the product.
    - kvpress marks the first stage with the dtype's largest finite value, below +inf; here it is +inf, so
      a scorer that gives +inf to entries it always keeps (our snapkv's window) keeps them whichever stage
      they fall in. kvpress's SnapKV gives its window finite scores, so the two agree there.
    - epsilon is added on kvpress's scale of the scorer (see stage_two): with snapkv or pyramidkv, epsilon
      * window_size is added to our summed votes, which ranks as the official does.
    - The projected norm is computed in float32 (kvpress: in the model's dtype), the product in the wider
      of float32 and the scorer's dtype. kvpress averages the norm over the query heads sharing a KV head
      (GQA); Pythia has one query head per KV head, so there is nothing to average.
    - Prefill only (as kvpress's press): it cannot compress during decoding.

    Limitation: the scorer is built with its defaults, plus max_capacity_prompt = C when it has that setting
    (OverScorer); it is `inner`. Head-wise budgets are CriticalAdaKV (`criticaladakv`).
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
        check_stages(self.first_stage_ratio, self.epsilon)

    def score(self, layer, keys, values, queries):
        scores = self.inner.score(layer, keys, values, queries)  # (B, nh, L)
        first = int(self.keep_count(layer, keys.size(2)) * self.first_stage_ratio)
        refined = self.stage_two(layer, scores, values)
        if first > 0:
            chosen = scores.topk(first, dim=-1).indices
            refined.scatter_(-1, chosen, float("inf"))
        return refined


def check_stages(first_stage_ratio: float, epsilon: float):
    if not 0.0 <= first_stage_ratio <= 1.0:
        raise ValueError(f"first_stage_ratio must be in [0, 1] (the fraction of the budget the scorer chooses "
                         f"alone), got {first_stage_ratio}")
    if not (math.isfinite(epsilon) and epsilon >= 0):
        raise ValueError(f"epsilon must be a finite number >= 0, got {epsilon}")


@register
@dataclass
class CriticalAdaKV(OutputProjectionNorms, AdaKV):
    """CriticalAdaKV (Feng et al. 2025, arXiv 2502.03805), as in NVIDIA kvpress
    `kvpress/presses/criticalkv_press.py`, CriticalAdaKVPress (the authors' code): AdaKV's head budgets from the
    scorer's raw scores, then CriticalKV's two stages inside each head's budget. Per batch row and layer, with
    C = max_capacity_prompt the average per head:
    1. head budgets b_h: AdaKV's allocation on the raw scores (each head its own top int(C * alpha_safeguard),
       then the best of the rest over the layer's heads; sum_h b_h = nh * C);
    2. stage one: each head keeps its top int(b_h * first_stage_ratio) entries by raw score, and at least the
       safeguard's int(C * alpha_safeguard);
    3. stage two: the rest of b_h goes to the head's best by (s + epsilon) * ||v W_o^h||_1, as CriticalKV's.
    So a head's count is b_h, set before the refinement; the refinement only changes which entries fill it.
    `score` returns the stage-2 scores with every kept entry at +inf and the others finite, so that AdaKV's
    selection (`select`, inherited) keeps exactly the +inf entries. It is not AdaKV over CriticalKV
    (`adakv` with scorer `criticalkv`, still available): there the stage-one entries, scored +inf, weigh in the
    allocation, a floor of first_stage_ratio * C per head that overrides the safeguard.

    Deviations, deliberate (beyond AdaKV's and CriticalKV's, which apply):
    - the budgets are per batch row; kvpress adds up the head counts of all rows of a batch (the same for a
      batch of one);
    - the safeguard's entries are kept as stage-one entries; kvpress marks them with the dtype's largest value
      before multiplying by the projected norm, which keeps them too unless a value projects to exactly zero.
    """

    name = "criticaladakv"
    label_names = {"first_stage_ratio": "fs", "epsilon": "eps"}
    scorer: Policy = "snapkv"
    first_stage_ratio: float = 0.5  # kvpress's default
    epsilon: float = 1e-4  # kvpress's default

    def validate(self):
        super().validate()
        check_stages(self.first_stage_ratio, self.epsilon)

    def refused_scorer(self, cls):
        if issubclass(cls, CriticalKV):
            return "criticaladakv applies CriticalKV's refinement itself: give criticalkv's scorer"
        return super().refused_scorer(cls)

    def score(self, layer, keys, values, queries):
        scores = self.inner.score(layer, keys, values, queries)  # (B, nh, L), raw
        keep = self.keep_count(layer, keys.size(2))
        budgets = adaptive_selection(scores, keep, self.alpha_safeguard).sum(dim=-1, keepdim=True)  # (B, nh, 1)
        first = (budgets.double() * self.first_stage_ratio).long().clamp(min=int(keep * self.alpha_safeguard))
        by_score = scores.argsort(dim=-1, descending=True, stable=True).argsort(dim=-1)  # 0 = the head's best
        refined = self.stage_two(layer, scores, values)
        ranked = refined.masked_fill(by_score < first, float("inf"))
        kept = ranked.argsort(dim=-1, descending=True, stable=True).argsort(dim=-1) < budgets
        # Every other entry finite, so that the layer's top nh * C is exactly the kept set.
        return refined.clamp(max=torch.finfo(refined.dtype).max).masked_fill(kept, float("inf"))
