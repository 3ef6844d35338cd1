"""Weight initialisation rules; the only place init lives (STYLE.md §9)."""

from __future__ import annotations

import torch.nn as nn

_CONVS = (
    nn.Conv1d,
    nn.Conv2d,
    nn.Conv3d,
    nn.ConvTranspose1d,
    nn.ConvTranspose2d,
    nn.ConvTranspose3d,
)


def he_init(module: nn.Module) -> None:
    """He-normal init of every conv (Ronneberger et al. 2015, §3: std = sqrt(2/N), N = fan-in).

    Biases start at zero; norm layers keep weight 1, bias 0. For transposed convs, torch's
    ``fan_in`` of the weight is out_channels·k^d; the paper's N counts the inputs of one
    output neuron, which for a stride-2 kernel-2 transposed conv is in_channels, so that is
    used instead.
    """
    if is_meta(module):
        return
    for m in module.modules():
        if isinstance(m, _CONVS):
            if isinstance(m, (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)):
                fan_in = m.in_channels
                nn.init.normal_(m.weight, 0.0, (2.0 / fan_in) ** 0.5)
            else:
                nn.init.kaiming_normal_(m.weight, mode="fan_in", nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)


def is_meta(module: nn.Module) -> bool:
    """True for a module built on the meta device (``registry.model_info`` counts parameters
    there): it holds no values to initialise, and random init on meta tensors would load
    torch's compiler (seconds of start-up for ``unetkit models``)."""
    first = next(iter(module.parameters()), None)
    return first is not None and first.is_meta


def zero_module(module: nn.Module) -> nn.Module:
    """Zero all parameters of ``module`` (residual/attention output projections) and return it."""
    for p in module.parameters():
        nn.init.zeros_(p)
    return module
