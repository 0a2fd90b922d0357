"""Bit-packed asymmetric quantization of K and V, as KIVI stores them (Liu et al. 2024, "KIVI: A Tuning-Free
Asymmetric 2bit Quantization for KV Cache").

Keys are quantized per channel: each group of `group` consecutive tokens shares, for every channel, one
minimum and one scale (the outlier channels of keys stay within their own range). Values are quantized per
token: each token's channels, in groups of `group` channels, share one minimum and one scale. A group's
codes are round((x - min) / scale) in [0, 2^bits - 1], with scale = (max - min) / (2^bits - 1); the
minimum and scale are stored in float16, as KIVI's, and the codes are packed 8 / bits to a byte, so that
the memory held is really the packed size.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

BITS = (2, 4, 8)


def pack(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """uint8 codes (..., D) in [0, 2^bits) -> (..., D * bits / 8) bytes, code i of a byte in its bits
    [i * bits, (i + 1) * bits)."""
    per_byte = 8 // bits
    grouped = codes.view(*codes.shape[:-1], codes.size(-1) // per_byte, per_byte)
    packed = torch.zeros(grouped.shape[:-1], dtype=torch.uint8, device=codes.device)
    for i in range(per_byte):
        packed |= grouped[..., i] << (bits * i)
    return packed


def unpack(packed: torch.Tensor, bits: int) -> torch.Tensor:
    """The inverse of pack: (..., D * bits / 8) bytes -> uint8 codes (..., D)."""
    per_byte = 8 // bits
    mask = (1 << bits) - 1
    codes = torch.stack([(packed >> (bits * i)) & mask for i in range(per_byte)], dim=-1)
    return codes.view(*packed.shape[:-1], packed.size(-1) * per_byte)


@dataclass
class Quantized:
    """A (B, nh, n, D) tensor, quantized along one axis in groups: `codes` packed (B, nh, n, D * bits / 8);
    `minimum` and `scale` float16, (B, nh, n / group, D) along tokens (keys) or (B, nh, n, D / group)
    along channels (values)."""
    codes: torch.Tensor
    minimum: torch.Tensor
    scale: torch.Tensor
    bits: int
    group: int
    along_tokens: bool

    @property
    def num_tokens(self) -> int:
        return self.codes.size(2)

    @property
    def nbytes(self) -> int:
        return sum(t.untyped_storage().nbytes() for t in (self.codes, self.minimum, self.scale))

    def dequantize(self, dtype: torch.dtype) -> torch.Tensor:
        """The (B, nh, n, D) tensor the codes stand for: code * scale + minimum, computed in float32."""
        codes = unpack(self.codes, self.bits).float()
        grouped = _grouped(codes, self.group, self.along_tokens)
        x = grouped * self.scale.float().unsqueeze(-2 if self.along_tokens else -1) + \
            self.minimum.float().unsqueeze(-2 if self.along_tokens else -1)
        return x.view(codes.shape).to(dtype)

    def cat(self, other: "Quantized") -> "Quantized":
        """These tokens followed by other's (the same bits, group and axis)."""
        axis = 2
        return Quantized(torch.cat((self.codes, other.codes), axis), torch.cat((self.minimum, other.minimum), axis),
                         torch.cat((self.scale, other.scale), axis), self.bits, self.group, self.along_tokens)


def _grouped(x: torch.Tensor, group: int, along_tokens: bool) -> torch.Tensor:
    """(B, nh, n, D) -> (B, nh, n / group, group, D) along tokens, (B, nh, n, D / group, group) along channels."""
    B, H, n, D = x.shape
    return x.view(B, H, n // group, group, D) if along_tokens else x.view(B, H, n, D // group, group)


def quantize(x: torch.Tensor, bits: int, group: int, along_tokens: bool) -> Quantized:
    """x (B, nh, n, D) -> its codes, minima and scales (n, or D, a multiple of group)."""
    if bits not in BITS:
        raise ValueError(f"bits must be one of {BITS}, got {bits}")
    grouped = _grouped(x.float(), group, along_tokens)
    dim = -2 if along_tokens else -1
    low, high = grouped.amin(dim=dim), grouped.amax(dim=dim)
    # The stored (float16) minimum and scale are those the codes are computed with, so that dequantizing
    # gives the nearest representable value of each group's grid.
    minimum = low.half()
    scale = ((high - low) / (2**bits - 1)).half()
    safe = torch.where(scale == 0, torch.ones_like(scale), scale).float()  # a constant group: every code 0
    codes = ((grouped - minimum.float().unsqueeze(dim)) / safe.unsqueeze(dim)).round().clamp(0, 2**bits - 1)
    codes = codes.to(torch.uint8).view(x.shape)
    return Quantized(pack(codes, bits), minimum, scale, bits, group, along_tokens)
