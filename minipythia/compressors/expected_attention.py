from dataclasses import dataclass

import torch

from ..rotary import rotary_cos_sin
from .base import CapacityBudget, Compressor
from .registry import register


@register
@dataclass
class ExpectedAttention(CapacityBudget, Compressor):
    """Expected Attention (Devoto et al. 2025, "Expected Attention: KV Cache Compression by Estimating
    Attention from Future Queries Distribution"), as in NVIDIA kvpress
    `kvpress/presses/expected_attention_press.py`, ExpectedAttentionPress.

    Scores each prompt key by the attention that the queries of the next `n_future_positions` positions
    are expected to give it, modelling those queries as a Gaussian fitted to the prompt's own queries:
    - mean mu and covariance Sigma (divided by the count) of the prompt's queries BEFORE rotary, leaving
      out the first n_sink tokens (outliers, as kvpress);
    - the rotary of positions L .. L + n_future_positions - 1, averaged into one matrix R (the mean of the
      rotation matrices), moves them to the future: mu' = R mu, Sigma' = R Sigma R^T;
    - key k (after rotary) gets exp(mu'.k / sqrt(d) + k^T Sigma' k / (2 d)), normalised over the
      non-sink keys (a softmax; the second term only with use_covariance);
    - with use_vnorm the score is (that + epsilon) * ||v||;
    - the n_sink first tokens are always kept (kvpress pads them with the max score + 1).
    The max_capacity_prompt = C best entries are kept per head; prompts with L <= C stay whole.

    Deviations, deliberate: the budget is a capacity C, as the other policies here, not kvpress's
    compression_ratio. kvpress rebuilds the pre-rotary queries from the hidden states; here they are the
    cached (rotated) prompt queries rotated back from their positions 0 .. L-1. kvpress rotates the whole
    head; Pythia rotates only its first rotary_ndims features, so R rotates those and leaves the rest as
    they are (with rotary_pct = 1 this is kvpress's R exactly). Scores are computed in float32.

    The rotary settings come from the model's config (for_model, which the cache calls). It scores at the
    prefill only: during decoding score() would not know the positions of the queries it is given.
    """

    name = "expected_attention"
    label_names = {"n_future_positions": "future", "n_sink": "sink", "use_covariance": "cov",
                   "use_vnorm": "vnorm", "epsilon": "eps"}
    cannot_decode = ("its query statistics need the prompt's queries at their positions 0 .. L-1, and a compression "
                     "during decoding gets only the newest queries, whose positions score() is not told")
    max_capacity_prompt: int = 512
    n_future_positions: int = 512
    n_sink: int = 4
    use_covariance: bool = True
    use_vnorm: bool = True
    epsilon: float = 0.0

    def __post_init__(self):
        super().__post_init__()
        # A plain attribute, not a setting: the model's config, for its rotary (set by for_model).
        self.model_config = None
        # rotations() of the last prompt length: (its key, its tensors), None before the first.
        self.cached_rotations = None

    def validate(self):
        super().validate()
        if self.n_future_positions < 1:
            raise ValueError(f"n_future_positions must be >= 1, got {self.n_future_positions}")
        if self.n_sink < 0:
            raise ValueError(f"n_sink must be >= 0, got {self.n_sink}")
        if self.n_sink >= self.max_capacity_prompt:
            raise ValueError(f"n_sink ({self.n_sink}) must be smaller than max_capacity_prompt "
                             f"({self.max_capacity_prompt}): the sinks are always kept")
        if not 0.0 <= self.epsilon < float("inf"):
            raise ValueError(f"epsilon must be a finite number >= 0, got {self.epsilon}")

    def for_model(self, config):
        self.model_config = config

    def score(self, layer, keys, values, queries):
        if self.model_config is None:
            raise ValueError("ExpectedAttention needs the model's rotary settings: use it through a model's cache, "
                             "or call for_model(model.config) first")
        B, H, L, d = keys.shape
        if queries.size(2) != L:
            raise ValueError(f"ExpectedAttention scores a prefill (one query per key, at positions 0 .. L-1); got "
                             f"{queries.size(2)} queries for {L} keys")
        s = self.n_sink
        if L <= s:  # only sinks (the cache never asks: it scores prompts longer than C > n_sink)
            return keys.new_full((B, H, L), float("inf"), dtype=torch.float32)
        nd = self.model_config.rotary_ndims
        unrotate_cos, unrotate_sin, r_t = self.rotations(L, d, keys.device)

        # The prompt's queries before rotary: rotating by -angle undoes the rotation by +angle.
        q = queries[:, :, s:].float().clone()  # (B, H, L - s, d), a copy: rotated in place below
        if nd:
            q[..., :nd] = _rotate(q[..., :nd], unrotate_cos, unrotate_sin)
        mean = q.mean(dim=2, keepdim=True)  # (B, H, 1, d)
        mu = mean.squeeze(2) @ r_t  # (R mu)^T, (B, H, d)

        k = keys[:, :, s:].float()  # (B, H, L - s, d)
        logits = k @ mu.unsqueeze(-1) / d**0.5  # (B, H, L - s, 1)
        if self.use_covariance:
            centered = q.sub_(mean)  # q is not read again
            cov = centered.transpose(-1, -2) @ centered / (L - s)  # (B, H, d, d)
            cov = r_t.T @ cov @ r_t  # R Sigma R^T
            logits = logits + (k @ cov).mul_(k).sum(dim=-1, keepdim=True) / (2 * d)
        scores = logits.squeeze(-1).softmax(dim=-1)  # over the non-sink keys only, as kvpress
        if self.use_vnorm:
            scores = (scores + self.epsilon) * values[:, :, s:].float().norm(dim=-1)
        sinks = scores.new_full((B, H, s), float("inf"))  # always kept
        return torch.cat((sinks, scores), dim=-1)  # (B, H, L)

    def rotations(self, L: int, d: int, device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """For a prompt of L tokens: the cos and -sin that undo the rotary of positions n_sink .. L-1
        (L - n_sink, rotary_ndims), and R^T (d, d), R the mean rotation of the n_future_positions after the
        prompt. The same for every layer: computed at the first layer of a prompt length, kept for the others."""
        key = (L, d, device, self.model_config, self.n_sink, self.n_future_positions)
        if self.cached_rotations is None or self.cached_rotations[0] != key:
            config, s, nd = self.model_config, self.n_sink, self.model_config.rotary_ndims
            cos, sin = rotary_cos_sin(config, s, L - s, device, torch.float32)
            # The mean of the future positions' rotation matrices is the rotary formula with the mean cos and
            # sin (per feature). Applied to the rows of the identity it gives R^T, rotary features only.
            r_t = torch.eye(d, device=device)
            if nd:
                future_cos, future_sin = rotary_cos_sin(config, L, self.n_future_positions, device, torch.float32)
                r_t[:nd, :nd] = _rotate(r_t[:nd, :nd], future_cos.mean(dim=0), future_sin.mean(dim=0))
            self.cached_rotations = (key, (cos, -sin, r_t))
        return self.cached_rotations[1]


def _rotate(x, cos, sin):
    """GPT-NeoX "rotate half" rotary of x (..., nd) by cos, sin (..., nd)."""
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat((-x2, x1), dim=-1) * sin
