"""Model families; importing this package registers them."""

from unetkit.models import (
    attention_unet,  # noqa: F401
    deeplabv3plus,  # noqa: F401
    diffusion_unet,  # noqa: F401
    swin_unet,  # noqa: F401
    transunet,  # noqa: F401
    unet,  # noqa: F401
    unetpp,  # noqa: F401
    vnet,  # noqa: F401
)
