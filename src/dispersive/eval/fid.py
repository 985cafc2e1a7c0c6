"""Old name of :mod:`dispersive.eval.metrics` (it holds every metric, not only FID); kept so
that ``from dispersive.eval.fid import ...`` keeps working."""

from dispersive.eval.metrics import *  # noqa: F403
from dispersive.eval.metrics import __all__  # noqa: F401
