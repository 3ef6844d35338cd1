"""Routing of the conditioning signals (timestep embedding, text context) to the blocks.

A block declares what it needs with two class attributes, ``takes_emb`` and
``takes_context``; ``ConditionalSequential`` calls each layer with exactly that. This is
guided-diffusion's ``TimestepBlock`` / ``TimestepEmbedSequential`` idea (Dhariwal & Nichol
2021), kept apart from ownership: the layers are registered by their owner under the names
a file format dictates (``down_blocks.0.resnets.1``), and the container only fixes the
order, so state-dict keys stay those of the ecosystem.
"""

from __future__ import annotations

from collections.abc import Callable

import torch


def _call_for(layer: Callable[..., torch.Tensor]) -> Callable[..., torch.Tensor]:
    takes_emb = getattr(layer, "takes_emb", False)
    takes_context = getattr(layer, "takes_context", False)
    if takes_emb and takes_context:
        return layer
    if takes_emb:
        return lambda x, emb, context: layer(x, emb)
    if takes_context:
        return lambda x, emb, context: layer(x, context)
    return lambda x, emb, context: layer(x)


class ConditionalSequential:
    """Run layers in order, passing ``emb`` / ``context`` only to layers that declare them.

    The container does not own (register) its layers, so it adds no state-dict keys; build
    it when needed from the owner's current children (it is cheap), so a swapped-in layer
    (e.g. a LoRA wrapper) is always the one that runs.

    Args:
        *layers: modules; a layer with ``takes_emb = True`` is called ``layer(x, emb)``, with
            ``takes_context = True`` as ``layer(x, context)``, with both as
            ``layer(x, emb, context)``, otherwise ``layer(x)``.

    Example:
        >>> step = ConditionalSequential(resblock, transformer)   # doctest: +SKIP
        >>> h = step(h, emb, context)                             # doctest: +SKIP
    """

    __slots__ = ("_calls", "layers")

    def __init__(self, *layers: Callable[..., torch.Tensor]) -> None:
        self.layers = layers
        self._calls = tuple(_call_for(layer) for layer in layers)

    def __call__(
        self, x: torch.Tensor, emb: torch.Tensor | None = None, context: torch.Tensor | None = None
    ) -> torch.Tensor:
        for call in self._calls:
            x = call(x, emb, context)
        return x

    def __repr__(self) -> str:
        return f"ConditionalSequential({', '.join(type(m).__name__ for m in self.layers)})"
