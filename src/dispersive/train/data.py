"""Deprecated location of :mod:`dispersive.data.datasets` (the datasets serve the sampling,
diagnosis and classifier commands as well as training, so they sit in layer L2); this alias
keeps ``from dispersive.train.data import ...`` working."""

import warnings

from dispersive.data.datasets import *  # noqa: F403
from dispersive.data.datasets import __all__  # noqa: F401

warnings.warn(
    "dispersive.train.data moved to dispersive.data.datasets; import it from there",
    DeprecationWarning,
    stacklevel=2,
)
