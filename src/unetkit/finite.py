"""Finite checks at the boundaries: NaN or infinity in weights or pixels is refused where it
enters (a checkpoint, an adapter, an image), with the file and the first bad tensor named,
instead of silently producing black images or NaN checkpoints later.

Example:
    >>> check_finite_tensors({"w": torch.ones(2)}, source="model.safetensors")
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from unetkit.errors import NonFiniteError


def check_finite_tensors(
    tensors: Mapping[str, torch.Tensor], *, source: str, what: str = "weights"
) -> None:
    """Raise NonFiniteError naming ``source`` and the tensors holding NaN/inf.

    Args:
        tensors: name -> tensor (integer and bool tensors are always finite).
        source: the file (or description) named in the message.
        what: what the tensors are, for the message ("weights", "adapter weights").
    """
    bad = [
        name
        for name, t in tensors.items()
        if t.is_floating_point() or t.is_complex()
        if not bool(torch.isfinite(t).all())
    ]
    if bad:
        more = f" (+{len(bad) - 3} more)" if len(bad) > 3 else ""
        raise NonFiniteError(
            f"{source}: {what} hold NaN or infinity in {len(bad)} tensor(s): "
            f"{', '.join(bad[:3])}{more}; the file is damaged or came from a diverged run"
        )
