"""Averaged-probability ensembles of one architecture (nnU-Net's fold ensembles).

``train --folds K`` trains K models, each on all images but one fold; at prediction their
class probabilities are averaged (Isensee et al. 2021, nnU-Net: "the softmax outputs of
the five models are averaged"). The ensemble is a model like any other: it returns the
*logits of the averaged probabilities*, log p̄ (softmax outputs) or logit p̄ (one sigmoid
channel), so the softmax/sigmoid every caller applies gives p̄ back exactly, and tiling,
test-time augmentation and the size planner need nothing new.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn as nn

from unetkit.errors import ConfigError
from unetkit.models.base import SegmentationModel

_EPS = 1e-7  # keeps log/logit finite where every member is certain


class ProbabilityEnsemble(SegmentationModel):
    """Members of one architecture and configuration; forward = logits of their mean
    probabilities.

    Args:
        members: segmentation models of the same class and ``config`` (e.g. the K fold
            models of one recipe).

    Example:
        >>> import unetkit
        >>> nets = [unetkit.create_model("unet", channels=(4, 8)) for _ in range(2)]
        >>> ens = ProbabilityEnsemble(nets)
        >>> ens(torch.zeros(1, 1, 16, 16)).shape
        torch.Size([1, 2, 16, 16])
    """

    def __init__(self, members: Sequence[nn.Module]) -> None:
        super().__init__()
        if not members:
            raise ConfigError("ProbabilityEnsemble: no members; give at least one model")
        first = members[0]
        if not isinstance(first, SegmentationModel):
            raise ConfigError(
                f"ProbabilityEnsemble: member 0 is a {type(first).__name__}, not a unetkit "
                "segmentation model"
            )
        for i, member in enumerate(members[1:], start=1):
            if type(member) is not type(first) or member.config != first.config:
                raise ConfigError(
                    f"ProbabilityEnsemble: member {i} ({type(member).__name__}) differs in "
                    "architecture or configuration from member 0; members must share both"
                )
        self.members = nn.ModuleList(members)
        self.config = first.config
        self.in_channels, self.out_channels, self.dims = (
            first.in_channels,
            first.out_channels,
            first.dims,
        )

    def _output_length(self, n: int) -> int | None:
        return self.members[0]._output_length(n)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # N×C×... per member -> mean probabilities -> their logits
        mean = torch.stack([m.probabilities(m(x)) for m in self.members]).mean(0)
        if mean.shape[1] == 1:
            return torch.logit(mean, eps=_EPS)
        return torch.log(mean.clamp_min(_EPS))
