"""Old name of :mod:`dispersive.ddpm` (it holds only the DDPM schedule); kept so that
``from dispersive.schedules import ...`` keeps working."""

from dispersive.ddpm import *  # noqa: F403
from dispersive.ddpm import __all__  # noqa: F401
