"""Gating and recalibration blocks for skip connections, for any ``dims``.

- :class:`AttentionGate`: the additive attention gate of Oktay et al., "Attention U-Net:
  Learning Where to Look for the Pancreas" (MIDL 2018), eq. (1)-(2), in its grid form.
- :class:`GatedSkip`: one or more attention gates on a skip, merged by a 1×1 conv (the
  official implementation's single-/multi-gate block).
- :class:`ChannelSE`, :class:`SpatialSE`, :class:`SCSE`: squeeze-and-excitation of Hu et al.
  (CVPR 2018) and the concurrent spatial/channel variant of Roy et al. (MICCAI 2018).
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from unetkit.errors import ConfigError
from unetkit.nn.conv import ConvNormAct
from unetkit.nn.dims import INTERP_MODES, check_dims, conv_nd


def _resize(x: torch.Tensor, size: torch.Size | tuple[int, ...]) -> torch.Tensor:
    if tuple(x.shape[2:]) == tuple(size):
        return x
    mode = INTERP_MODES[x.dim() - 2]
    return F.interpolate(x, size=tuple(size), mode=mode, align_corners=False)


class AttentionGate(nn.Module):
    """Additive attention gate: weight a skip feature map by coefficients in [0, 1].

    With skip features ``x`` (fine) and a gating signal ``g`` from the coarser level
    (Oktay et al. 2018, eq. 1-2)::

        q = psi(relu(theta(x) + phi(g)))        theta: k×k conv, stride k (grid attention)
        alpha = sigmoid(q)                      N×1×(S/k), resampled to S
        out = project(alpha * x)                project: 1×1 conv + norm (official "W")

    ``theta`` has no bias; ``phi`` carries ``b_g`` and ``psi`` carries ``b_psi``, as in the
    paper's parameter list.

    Args:
        dims: 1, 2 or 3.
        skip_channels: channels of ``x`` (F_l).
        gate_channels: channels of ``g`` (F_g).
        inter_channels: channels of the joint space (F_int).
        subsample: stride of ``theta``; 2 brings ``x`` to the gating signal's grid.
        norm: normalisation of the output projection (none | batch | group | ...).
        project: apply the output projection (the official implementation does; the
            paper's eq. 2 is ``alpha * x`` alone).

    Shapes:
        ``forward(x: N×F_l×S, g: N×F_g×S') -> (N×F_l×S, alpha: N×1×S)``; ``g`` is resampled
        to ``theta(x)``'s grid when the sizes differ.

    Example:
        >>> gate = AttentionGate(2, 8, 16, 8)
        >>> out, alpha = gate(torch.randn(1, 8, 12, 12), torch.randn(1, 16, 6, 6))
        >>> out.shape, alpha.shape
        (torch.Size([1, 8, 12, 12]), torch.Size([1, 1, 12, 12]))
    """

    def __init__(
        self,
        dims: int,
        skip_channels: int,
        gate_channels: int,
        inter_channels: int,
        *,
        subsample: int = 2,
        norm: str = "batch",
        project: bool = True,
    ) -> None:
        super().__init__()
        check_dims(dims)
        if min(skip_channels, gate_channels, inter_channels, subsample) < 1:
            raise ConfigError(
                f"AttentionGate: channels ({skip_channels}, {gate_channels}, {inter_channels}) "
                f"and subsample={subsample} must all be ≥ 1"
            )
        conv = conv_nd(dims)
        self.theta = conv(skip_channels, inter_channels, subsample, stride=subsample, bias=False)
        self.phi = conv(gate_channels, inter_channels, 1)
        self.psi = conv(inter_channels, 1, 1)
        self.project = (
            ConvNormAct(dims, skip_channels, skip_channels, 1, norm=norm, act="none")
            if project
            else nn.Identity()
        )

    def coefficients(self, x: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
        """The attention coefficients alpha, N×1×(x's spatial size), in [0, 1]."""
        theta_x = self.theta(x)  # N×F_int×S/k
        phi_g = _resize(self.phi(g), theta_x.shape[2:])  # N×F_int×S/k
        alpha = torch.sigmoid(self.psi(F.relu(theta_x + phi_g)))  # N×1×S/k
        return _resize(alpha, x.shape[2:])  # N×1×S

    def forward(self, x: torch.Tensor, g: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        alpha = self.coefficients(x, g)
        return self.project(alpha * x), alpha


class GatedSkip(nn.Module):
    """``heads`` attention gates on one skip, concatenated and merged by a 1×1 ConvNormAct.

    The official Attention U-Net code uses this block with one gate
    (``unet_CT_single_att_dsv_3D``) or two (``unet_CT_multi_att_dsv_3D``, the CT model).

    Args:
        dims, skip_channels, gate_channels: as in AttentionGate.
        heads: number of parallel gates.
        inter_channels: F_int of each gate (default ``skip_channels``, as in the official code).
        norm, act: of the merging 1×1 conv (the gates' projections use ``norm`` too).

    Shapes:
        ``forward(x, g) -> (N×F_l×S, alpha: N×1×S)``; alpha is the mean over the heads.

    Example:
        >>> skip = GatedSkip(3, 4, 8, heads=2)
        >>> y, a = skip(torch.randn(1, 4, 6, 6, 6), torch.randn(1, 8, 3, 3, 3))
        >>> y.shape, a.shape
        (torch.Size([1, 4, 6, 6, 6]), torch.Size([1, 1, 6, 6, 6]))
    """

    def __init__(
        self,
        dims: int,
        skip_channels: int,
        gate_channels: int,
        *,
        heads: int = 1,
        inter_channels: int | None = None,
        norm: str = "batch",
        act: str = "relu",
    ) -> None:
        super().__init__()
        if heads < 1:
            raise ConfigError(f"GatedSkip: heads={heads} must be ≥ 1")
        inter = inter_channels or skip_channels
        self.gates = nn.ModuleList(
            AttentionGate(dims, skip_channels, gate_channels, inter, norm=norm)
            for _ in range(heads)
        )
        self.merge = ConvNormAct(dims, heads * skip_channels, skip_channels, 1, norm=norm, act=act)

    def forward(self, x: torch.Tensor, g: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        outs, alphas = zip(*(gate(x, g) for gate in self.gates), strict=True)
        alpha = alphas[0] if len(alphas) == 1 else torch.stack(alphas).mean(dim=0)
        return self.merge(torch.cat(outs, dim=1)), alpha


class ChannelSE(nn.Module):
    """Channel squeeze-and-excitation (Hu et al., CVPR 2018): ``x * sigmoid(W2 relu(W1 mean(x)))``.

    Args:
        dims: 1, 2 or 3.   channels: C.   reduction: bottleneck ratio r (C/r hidden units).

    Example:
        >>> ChannelSE(2, 8)(torch.randn(2, 8, 5, 5)).shape
        torch.Size([2, 8, 5, 5])
    """

    def __init__(self, dims: int, channels: int, reduction: int = 2) -> None:
        super().__init__()
        hidden = max(1, channels // reduction)
        self.fc1 = conv_nd(dims)(channels, hidden, 1)
        self.fc2 = conv_nd(dims)(hidden, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = x.mean(dim=tuple(range(2, x.dim())), keepdim=True)  # N×C×1…
        return x * torch.sigmoid(self.fc2(F.relu(self.fc1(z))))


class SpatialSE(nn.Module):
    """Spatial squeeze-and-excitation (Roy et al. 2018): ``x * sigmoid(conv1x1(x))``, C -> 1.

    Example:
        >>> SpatialSE(3, 4)(torch.randn(1, 4, 3, 3, 3)).shape
        torch.Size([1, 4, 3, 3, 3])
    """

    def __init__(self, dims: int, channels: int) -> None:
        super().__init__()
        self.squeeze = conv_nd(dims)(channels, 1, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.sigmoid(self.squeeze(x))


class SCSE(nn.Module):
    """Concurrent spatial and channel SE (Roy, Navab & Wachinger, MICCAI 2018): cSE(x) + sSE(x).

    Example:
        >>> SCSE(1, 6)(torch.randn(2, 6, 9)).shape
        torch.Size([2, 6, 9])
    """

    def __init__(self, dims: int, channels: int, reduction: int = 2) -> None:
        super().__init__()
        self.cse = ChannelSE(dims, channels, reduction)
        self.sse = SpatialSE(dims, channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.cse(x) + self.sse(x)
