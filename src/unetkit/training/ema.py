"""Exponential moving average (Polyak averaging) of a model's trainable parameters.

After every optimizer step ``update`` moves a float32 shadow copy of each trained parameter
towards it: shadow ← d·shadow + (1 - d)·param. With ``warmup`` the decay ramps up as
d = min(decay, (1 + n) / (10 + n)) after n updates, so a short run's average is not
dominated by its random initialisation (the schedule diffusers' ``EMAModel`` uses).
Diffusion models in particular sample much cleaner from the averaged weights.

Example:
    >>> net = torch.nn.Linear(2, 2)
    >>> ema = EMA(list(net.named_parameters()), decay=0.999)
    >>> ema.update()                        # after optimizer.step()
    >>> with ema.applied():                 # validate / save the averaged weights
    ...     _ = net(torch.zeros(1, 2))
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import torch
import torch.nn as nn

from unetkit.errors import CheckpointError, ConfigError


class EMA:
    """Shadow weights of ``named_params`` (the trained ones; frozen ones need none).

    Args:
        named_params: (name, parameter) pairs, e.g. the trainer's trainable parameters.
        decay: the long-run decay d in (0, 1); the average spans about 1 / (1 - d) steps.
        warmup: ramp the decay up from 0 over the first steps (see the module docstring).
    """

    def __init__(
        self,
        named_params: Sequence[tuple[str, nn.Parameter]],
        decay: float,
        *,
        warmup: bool = True,
    ) -> None:
        check_decay(decay)
        self.decay, self.warmup, self.updates = float(decay), warmup, 0
        self.params = dict(named_params)
        self.shadow = {n: p.detach().float().clone() for n, p in self.params.items()}

    def current_decay(self) -> float:
        """The decay the next ``update`` applies."""
        if not self.warmup:
            return self.decay
        return min(self.decay, (1 + self.updates) / (10 + self.updates))

    @torch.no_grad()
    def update(self) -> None:
        """Move every shadow towards its parameter (call after each optimizer step)."""
        d = self.current_decay()
        for name, p in self.params.items():
            self.shadow[name].lerp_(p.detach().float(), 1.0 - d)
        self.updates += 1

    @contextlib.contextmanager
    def applied(self) -> Iterator[None]:
        """Inside the block the parameters hold the averages; afterwards their own values."""
        backup = {n: p.detach().clone() for n, p in self.params.items()}
        self.copy_to_params()
        try:
            yield
        finally:
            with torch.no_grad():
                for name, p in self.params.items():
                    p.copy_(backup[name])

    @torch.no_grad()
    def copy_to_params(self) -> None:
        """Overwrite the parameters with the averages (e.g. when training ends)."""
        for name, p in self.params.items():
            p.copy_(self.shadow[name].to(p.dtype))

    def state_dict(self) -> dict[str, Any]:
        """Shadows and the update count (for the trainer's resumable state)."""
        return {"decay": self.decay, "updates": self.updates, "shadow": dict(self.shadow)}

    def load_state_dict(self, state: Mapping[str, Any], *, source: str = "EMA state") -> None:
        """Restore ``state_dict()``; the parameter names and shapes must match."""
        shadow = state["shadow"]
        if set(shadow) != set(self.params):
            missing = sorted(set(self.params) - set(shadow))[:5]
            unexpected = sorted(set(shadow) - set(self.params))[:5]
            raise CheckpointError(
                f"{source}: EMA weights do not match the trained parameters "
                f"(missing {missing}, unexpected {unexpected})"
            )
        for name, value in shadow.items():
            if value.shape != self.shadow[name].shape:
                raise CheckpointError(
                    f"{source}: EMA weight {name} has shape {tuple(value.shape)}, "
                    f"the parameter {tuple(self.shadow[name].shape)}"
                )
            self.shadow[name].copy_(value)
        self.updates = int(state["updates"])


def check_decay(decay: float | None) -> None:
    """ConfigError unless ``decay`` is None or in (0, 1)."""
    if decay is not None and not 0.0 < decay < 1.0:
        raise ConfigError(f"ema_decay={decay} must be in (0, 1), e.g. 0.999 (or None: no EMA)")
