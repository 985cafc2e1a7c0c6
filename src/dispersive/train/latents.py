"""Deprecated location of :mod:`dispersive.data.latents` (the latent cache serves
``dispersive sample`` and ``extract-latents`` as well as training, so it sits in layer L2); this
alias keeps ``from dispersive.train.latents import ...`` working."""

import warnings

from dispersive.data.latents import *  # noqa: F403
from dispersive.data.latents import __all__  # noqa: F401

warnings.warn(
    "dispersive.train.latents moved to dispersive.data.latents; import it from there",
    DeprecationWarning,
    stacklevel=2,
)
