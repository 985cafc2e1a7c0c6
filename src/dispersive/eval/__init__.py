"""Evaluation (layer L2): sample files, feature networks, generative metrics, diagnostics.

Kept light on purpose (``import dispersive`` never imports this package, and importing it loads
nothing heavy); import the submodule you need:

- :mod:`dispersive.eval.io`: [-1, 1] tensors <-> uint8 NHWC, ADM .npz, image folders, grids.
- :mod:`dispersive.eval.features`: the shipped Fashion-MNIST classifier, FID Inception loading.
- :mod:`dispersive.eval.metrics`: FID / IS / KID (torchmetrics), precision/recall, statistics files,
  ``evaluate(samples, ref, features=...)``.
- :mod:`dispersive.eval.proxy`: ``proxy_fid(images)`` for the training loop.
- :mod:`dispersive.eval.diagnostics`: ``block_norms(model, x0, y, ts=..., generator=...)``.
"""

__all__ = ["io", "features", "metrics", "proxy", "diagnostics"]
