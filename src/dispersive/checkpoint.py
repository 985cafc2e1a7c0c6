"""Deprecated location of :mod:`dispersive.train.checkpoint` (checkpoints are written and read
by the training system, layer L3); this alias keeps ``from dispersive.checkpoint import ...``
working."""

import warnings

from dispersive.train.checkpoint import *  # noqa: F403
from dispersive.train.checkpoint import __all__  # noqa: F401

warnings.warn(
    "dispersive.checkpoint moved to dispersive.train.checkpoint; import it from there",
    DeprecationWarning,
    stacklevel=2,
)
