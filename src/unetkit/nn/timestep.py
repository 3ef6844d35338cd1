"""Timestep embeddings for diffusion models: sinusoidal features and the two-layer MLP.

The sinusoidal features follow the Transformer positional encoding (Vaswani et al. 2017)
as used for noise levels by DDPM (Ho et al. 2020); ``flip_sin_to_cos`` and ``freq_shift``
select the variants found in Stable Diffusion checkpoints (cos first, shift 0).
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F


def timestep_embedding(
    timesteps: torch.Tensor,
    dim: int,
    *,
    flip_sin_to_cos: bool = True,
    freq_shift: float = 0.0,
    max_period: float = 10000.0,
) -> torch.Tensor:
    """Sinusoidal features of (possibly fractional) timesteps.

    Frequencies are ``max_period ** (-i / (dim/2 - freq_shift))`` for ``i < dim/2``; the output
    is ``[sin, cos]`` (or ``[cos, sin]`` with ``flip_sin_to_cos``), zero-padded if ``dim`` is odd.

    Args:
        timesteps: (B,) tensor of timesteps (int or float).
        dim: number of output features.
        flip_sin_to_cos: put the cosines first (Stable Diffusion does).
        freq_shift: the frequency denominator shift (0 for SD, 1 for the original DDPM code).
        max_period: the longest period.

    Returns:
        (B, dim) float32 tensor.

    Example:
        >>> timestep_embedding(torch.tensor([0, 999]), 320).shape
        torch.Size([2, 320])
    """
    half = dim // 2
    exponent = torch.arange(half, dtype=torch.float32, device=timesteps.device)
    freqs = torch.exp(exponent * (-math.log(max_period) / (half - freq_shift)))
    args = timesteps.float()[:, None] * freqs[None]
    sin, cos = torch.sin(args), torch.cos(args)
    emb = torch.cat([cos, sin] if flip_sin_to_cos else [sin, cos], dim=-1)
    if dim % 2:
        emb = F.pad(emb, (0, 1))
    return emb


class TimestepEmbedding(nn.Module):
    """MLP ``linear_1 -> SiLU -> linear_2`` that lifts sinusoidal features to the block width.

    Args:
        in_features: width of the sinusoidal features (the first stage's channels in SD).
        out_features: embedding width handed to the residual blocks (4x in SD).

    Example:
        >>> mlp = TimestepEmbedding(320, 1280)
        >>> mlp(timestep_embedding(torch.tensor([10.0]), 320)).shape
        torch.Size([1, 1280])
    """

    def __init__(self, in_features: int, out_features: int) -> None:
        super().__init__()
        self.linear_1 = nn.Linear(in_features, out_features)
        self.linear_2 = nn.Linear(out_features, out_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear_2(F.silu(self.linear_1(x)))
