"""Dispersive Loss (Wang & He, 2025): the loss family, feature taps, and a reference system.

The five-line API::

    from dispersive import FeatureTap, dispersive_loss

    tap = FeatureTap(model, "blocks.2")
    pred = model(x_t, t, y)
    loss = F.mse_loss(pred, target) + 0.5 * dispersive_loss(tap.pop(), tau=0.5)
    loss.backward()

``import dispersive`` stays light: no training, plotting, metrics or torchvision imports.
"""

from dispersive.losses import (
    DispersiveLoss,
    contrastive_loss,
    dispersion_stats,
    dispersive_loss,
)
from dispersive.taps import FeatureTap

__version__ = "0.1.0"

__all__ = [
    "DispersiveLoss",
    "FeatureTap",
    "contrastive_loss",
    "dispersion_stats",
    "dispersive_loss",
    "__version__",
]
