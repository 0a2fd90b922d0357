"""Rotary position embedding as GPT-NeoX applies it: partial (the first rotary_ndims features of each head),
in the "rotate half" form."""

from __future__ import annotations

import torch

from .config import PythiaConfig


def rotary_cos_sin(config: PythiaConfig, start: int, length: int, device, dtype):
    """cos, sin of shape (length, rotary_ndims) for positions start .. start+length-1, computed in float32."""
    nd = config.rotary_ndims
    inv_freq = 1.0 / config.rotary_emb_base ** (torch.arange(0, nd, 2, device=device, dtype=torch.float32) / nd)
    positions = torch.arange(start, start + length, device=device, dtype=torch.float32)
    freqs = torch.outer(positions, inv_freq)
    emb = torch.cat((freqs, freqs), dim=-1)  # (T, nd)
    return emb.cos().to(dtype), emb.sin().to(dtype)


def rotated_by(keys: torch.Tensor, shift: torch.Tensor, config: PythiaConfig) -> torch.Tensor:
    """keys (B, nh, n, hs), after rotary, moved by `shift` (B, nh, n) positions each: rotary at position p then
    by s is rotary at p + s (its rotations compose), computed in float32, returned in the keys' dtype."""
    nd = config.rotary_ndims
    inv_freq = 1.0 / config.rotary_emb_base ** (torch.arange(0, nd, 2, device=keys.device, dtype=torch.float32) / nd)
    angles = shift.to(torch.float32)[..., None] * inv_freq  # (B, nh, n, nd / 2)
    cos, sin = torch.cat((angles.cos(),) * 2, dim=-1), torch.cat((angles.sin(),) * 2, dim=-1)
    x = keys[..., :nd].float()
    x1, x2 = x.chunk(2, dim=-1)
    moved = x * cos + torch.cat((-x2, x1), dim=-1) * sin
    return torch.cat((moved.to(keys.dtype), keys[..., nd:]), dim=-1)


def apply_rotary_(qk: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """The "rotate half" form, in place, on the first rotary_ndims features of each head; the rest is
    untouched. qk (B, T, nh, 2, hs) holds queries and keys together, so one pass rotates both;
    cos, sin (T, nd) broadcast over batch, heads and q/k."""
    nd = cos.size(-1)
    cos, sin = cos[:, None, None], sin[:, None, None]  # (T, 1, 1, nd)
    x_rot = qk[..., :nd]
    x1, x2 = x_rot.chunk(2, dim=-1)
    rotated = torch.cat((-x2, x1), dim=-1)
    x_rot.copy_(x_rot * cos + rotated * sin)
    return qk
