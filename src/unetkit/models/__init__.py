"""Model families; importing this package registers them."""

from unetkit.models import unet  # noqa: F401
from unetkit.models import vnet  # noqa: F401
from unetkit.models import deeplabv3plus  # noqa: F401
from unetkit.models import unetpp  # noqa: F401
from unetkit.models import attention_unet  # noqa: F401
from unetkit.models import transunet  # noqa: F401
from unetkit.models import swin_unet  # noqa: F401
