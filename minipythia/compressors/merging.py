from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .base import QUERY_CHUNK, CapacityBudget, Compressor, attention_weights
from .over_scorer import OverScorer
from .registry import register
from .settings import Policy


@register
@dataclass
class Merging(OverScorer, CapacityBudget, Compressor):
    """CaM, cache merging (Zhang et al., ICML 2024, "CaM: Cache Merging for Memory-efficient LLMs
    Inference"), official code zyxxmu/cam, as a wrapper over any evicting policy (kvpress's MergingPress
    style: the wrapped policy chooses, the values are merged between the choice and the gather).

    The `scorer` chooses the kept entries, per (batch, head), exactly as it does alone. Then, per
    (batch, head), each evicted entry i, in position order, is merged into the n_i entries that follow it
    (n_i = m = merge_budget, fewer at the end of the cache), whether those are kept or evicted:

        p_i = clamp(A_i / mean(A_{i+1}, ..., A_{i+n_i}), 0, 1)
        V_j += p_i * V_i / n_i        for j = i+1 .. i+n_i

    A is the attention each entry received, summed over the queries the cache gives (the prompt's at the
    prefill, the newest ones during decoding); 0/0 gives p = 0, x/0 gives p = 1. Values are updated in
    place, so an evicted entry passes on, in its turn, what earlier ones merged into it, as the official
    loop does (`cam_hf/utils_lm_eval/modify_gptneox_cam.py`, local_cam_mask: V[j+1 : j+m+1] += ... for
    each token leaving the window). The kept entries keep their keys; only their values change.
    The reference mean is over the entries that receive, as in the paper's merge mask (Eq. 14), the
    official streaming cache (`generate_task/streaming_llm/kv_cache_cam.py`, slicev) and NVIDIA kvpress
    `kvpress/presses/cam_press.py` (CAMPress).

    Deviations, deliberate:
    - The official code draws the merge mask M_i ~ Bernoulli(p_i); here the weight is p_i itself, its
      expectation: every merged value is a sum over chains of distinct entries of products of their
      masks, which are independent, so the result is exactly the mean of the sampled ones, and is
      deterministic.
    - One eviction of many entries at once (the prefill, or a decode-time compression) instead of one per
      generated token: A is the attention of all those queries, over the full prefix our prefill attends
      to, where the official GPT-NeoX/LLaMA code recomputes it at each step from a start + recent masked
      attention. Its lm_eval path also takes the max over the start tokens and the window (itself
      included) as the reference, not the mean (its other paths and the paper take the mean).
    - An evicted entry with fewer than m followers splits its value among those (as kvpress); the last
      entry, if evicted, has none and is dropped. In the official code every evicted token has m.
    - kvpress's CAMPress runs during decoding only, merges into the next m *kept* entries without
      cascading, and merges only as many evicted entries as tokens came since the last compression.
    kvpress's own MergingPress (`kvpress/presses/merging_press.py`) is another rule, not CaM: each evicted
    value is blended into the kept entry with the most cosine-similar key.

    Default scorer: streaming_llm, since the official code evicts by a start + recent window (its
    start_ratio / recent_ratio; kvpress pairs CAMPress with StreamingLLMPress). The scorer is built by
    OverScorer: its defaults, plus max_capacity_prompt when it has that setting (which then does nothing
    for a scorer without one, e.g. knorm). It is `inner`; how many entries are kept and
    which (keep_count, score), the model's config, the prompt hook and the missing input are the
    scorer's. During decoding it reads the scorer's queries, at least the newest one (p needs attention).
    """

    name = "merging"
    label_names = {"scorer": "", "merge_budget": "m"}
    max_capacity_prompt: int = 512
    scorer: Policy = "streaming_llm"
    merge_budget: int = 32  # m: kvpress's default and the official GPT-NeoX decode path's

    def validate(self):
        super().validate()
        if self.merge_budget < 1:
            raise ValueError(f"merge_budget must be >= 1 (entries each evicted value is merged into), "
                             f"got {self.merge_budget}")

    def decode_queries(self):
        # Scorers that read no query (by position, by key) ignore the one kept for the merge probability.
        return max(1, self.scorer_decode_queries())

    def keep_count(self, layer, seq_len):
        return self.inner.keep_count(layer, seq_len)

    def score(self, layer, keys, values, queries):
        return self.inner.score(layer, keys, values, queries)

    def kept_values(self, layer, keys, values, queries, idx):
        evicted = torch.ones(idx.shape[:2] + (keys.size(2),), dtype=torch.bool, device=idx.device)
        evicted.scatter_(-1, idx, False)
        prob = merge_probability(received_attention(keys, queries), evicted, self.merge_budget)
        merged = merge_values(values, prob, self.merge_budget)
        return merged.gather(2, idx.unsqueeze(-1).expand(-1, -1, -1, values.size(-1)))


def received_attention(keys: torch.Tensor, queries: torch.Tensor) -> torch.Tensor:
    """The causal softmax attention (float32) each of the keys (B, nh, L, hs) received from the queries
    (B, nh, Q, hs) of the last Q entries, summed over the queries -> (B, nh, L): H2O's accumulated score."""
    L, Q = keys.size(2), queries.size(2)
    total = torch.zeros(keys.shape[:3], device=keys.device)
    for start in range(0, Q, QUERY_CHUNK):  # a (B, nh, QUERY_CHUNK, L) block at a time, as H2O
        end = min(start + QUERY_CHUNK, Q)
        seen = L - Q + end  # the chunk's queries are the last of these keys
        total[..., :seen].add_(attention_weights(queries[:, :, start:end], keys[:, :, :seen]).sum(dim=-2))
    return total


def receivers(L: int, merge_budget: int, device=None) -> torch.Tensor:
    """How many entries each position's value is merged into: those that follow it, at most merge_budget."""
    return (L - 1 - torch.arange(L, device=device)).clamp(max=merge_budget)


def merge_probability(received: torch.Tensor, evicted: torch.Tensor, merge_budget: int) -> torch.Tensor:
    """CaM's merge probability (B, nh, L) of each evicted entry: its received attention over the mean of
    its receivers', clamped to [0, 1]; 0 for kept entries and for an entry with no receiver."""
    L = received.size(-1)
    n = receivers(L, merge_budget, received.device)
    start = torch.arange(1, L + 1, device=received.device)  # receivers of i: i+1 .. i+n_i
    # Window sums from a cumulative sum in float64: the differences of a long float32 one lose the small terms.
    total = F.pad(received.double().cumsum(dim=-1), (1, 0))  # total[..., k] = sum of the first k
    mean = (total[..., start + n] - total[..., start]) / n.clamp(min=1)
    ratio = torch.nan_to_num(received.double() / mean, nan=0.0, posinf=1.0).clamp(0.0, 1.0)
    return torch.where(evicted & (n > 0), ratio, 0.0).float()


def merge_values(values: torch.Tensor, prob: torch.Tensor, merge_budget: int) -> torch.Tensor:
    """Every position's value (B, nh, L, hs), float32, once each entry with prob p > 0 has added
    p / n of its value to each of its n receivers, in position order."""
    merged = values.float().clone()
    L = merged.size(2)
    rate = prob / receivers(L, merge_budget, prob.device).clamp(min=1)
    rate_at = rate.permute(2, 0, 1)[..., None, None]  # (L, B, nh, 1, 1): position i's rates in one indexing step
    # In place and in order: what an entry passes on includes what the earlier ones merged into it. A sequential
    # cascade, one step per merged position: each step is kept to two operations on a view (add_ on the slice, not
    # `+=`, which would copy the slice back onto itself), since at a step's size the dispatch is most of the cost.
    for i in (prob > 0).flatten(0, 1).any(dim=0).nonzero().flatten().tolist():
        merged[:, :, i + 1 : i + 1 + merge_budget].add_(rate_at[i] * merged[:, :, i : i + 1])
    return merged
