"""Channel-dimension methods (fewer channels or fewer bits per cached token), one module each; importing this package
registers them."""

from .base import ChannelMethod
from . import coupled, kivi  # noqa: F401  (registers "coupled" and "kivi")
from . import eigen  # noqa: F401  (Eigen Attention, arXiv 2408.05646)
