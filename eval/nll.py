"""Per-token NLL, the check that stops a run before a non-finite one can become a result, and `retained`,
the figure every task reports from NLLs."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def token_nll(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """logits (1, T, V), targets (1, T) -> NLL (T,), from a float32 log_softmax whatever the model's dtype."""
    return F.cross_entropy(logits[0].float(), targets[0], reduction="none")


def nonfinite_nll(model, ids: torch.Tensor, what: str) -> ValueError:
    """The error that stops a run at a non-finite NLL, so that no NaN or Inf is ever written as a result.
    ids (1, T): the tokens whose forward is diagnosed; raised only once the NLL is found not finite, so that
    the diagnosis and its message cost nothing on the way."""
    return ValueError(f"non-finite NLL (NaN or Inf) {what}: it first appears in {model.locate_nonfinite(ids)}; "
                      f"the checkpoint is broken or the dtype overflows (try --dtype float32)")


def retained(control: float, full: float, this: float) -> float | None:
    """The share of full KV's advantage over the control this config keeps: 1 = as full KV, 0 = as the
    control; None when full KV has no advantage to keep (it would be a division by ~0)."""
    return (control - this) / (control - full) if control - full > 1e-9 else None
