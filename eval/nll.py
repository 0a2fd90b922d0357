"""Per-token NLL, and the check that stops a run before a non-finite one can become a result."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def token_nll(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """logits (1, T, V), targets (1, T) -> NLL (T,), from a float32 log_softmax whatever the model's dtype."""
    return F.cross_entropy(logits[0].float(), targets[0], reduction="none")


def check_finite_nll(model, nll: torch.Tensor, ids: torch.Tensor, what: str):
    """Stops the run at a non-finite NLL, so that no NaN or Inf is ever written as a result. ids (1, T): the
    tokens whose forward is diagnosed."""
    if not torch.isfinite(nll).all():
        raise ValueError(f"non-finite NLL (NaN or Inf) {what}: it first appears in {model.locate_nonfinite(ids)}; "
                         f"the checkpoint is broken or the dtype overflows (try --dtype float32)")
