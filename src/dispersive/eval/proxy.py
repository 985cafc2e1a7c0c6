"""In-training proxy FID: Fréchet distance of generated images to the shipped reference
statistics, under the shipped Fashion-MNIST domain classifier. Cheap enough to run every K steps.
"""

from __future__ import annotations

import functools

import torch
from torch import Tensor

from dispersive.errors import UserError

__all__ = ["proxy_fid", "proxy_metrics"]


@functools.lru_cache(maxsize=4)
def _reference(features: str):
    # Cached per process: the network and the statistics are loaded (and checksummed) once.
    from dispersive.eval.features import ASSETS_DIR, REF_STATS_FILE, get_extractor
    from dispersive.eval.metrics import load_statistics

    if features != "fashion-mnist":
        raise UserError(
            f"proxy_fid supports features='fashion-mnist' only (got {features!r}); "
            "use `dispersive eval` for Inception FID"
        )
    extractor = get_extractor(features)
    stats = load_statistics(ASSETS_DIR / REF_STATS_FILE)
    if stats.features and stats.features != extractor.id:
        raise UserError(
            f"shipped statistics were computed with {stats.features!r}, but the shipped network "
            f"is {extractor.id!r}; rerun `dispersive train-classifier`"
        )
    return extractor, stats


def proxy_fid(images: Tensor, *, features: str = "fashion-mnist") -> float:
    """FD of the images' domain features against the Fashion-MNIST training-set statistics.

    The images are quantised to uint8 exactly as sample files are (``round((x + 1) * 127.5)``),
    so this equals ``dispersive eval`` on the same images saved to an .npz.

    Args:
        images: (N, 1, 28, 28) float in [-1, 1], N >= 2 (a few thousand for a stable number;
            the estimate is biased upwards for small N).
        features: "fashion-mnist" (the only choice).

    Returns:
        The Fréchet distance (float; lower is better).
    """
    return proxy_metrics(images, features=features)["proxy_fid"]


def proxy_metrics(
    images: Tensor, labels: Tensor | None = None, *, features: str = "fashion-mnist"
) -> dict[str, float]:
    """The proxy FID and, for class-conditional samples, the domain classifier's agreement.

    Args:
        images: (N, 1, 28, 28) float in [-1, 1], N >= 2.
        labels: (N,) the classes the images were generated for, or None.
        features: "fashion-mnist" (the only choice).

    Returns:
        ``{"proxy_fid": FD}`` plus ``"proxy_acc"``: the fraction of images that the domain
        classifier assigns to the class they were generated for (when ``labels`` is given).
        A direct check that samples are recognisable garments of the right kind.
    """
    from dispersive.eval.io import to_uint8
    from dispersive.eval.metrics import feature_statistics, frechet_distance

    if images.ndim != 4 or tuple(images.shape[1:]) != (1, 28, 28) or images.shape[0] < 2:
        raise ValueError(
            f"proxy_fid takes (N, 1, 28, 28) images in [-1, 1] with N >= 2; "
            f"got {tuple(images.shape)}"
        )
    if not torch.isfinite(images).all():
        raise ValueError("proxy_fid: images contain NaN or inf")
    if labels is not None and tuple(labels.shape) != (images.shape[0],):
        raise ValueError(
            f"labels must have shape ({images.shape[0]},), one per image; got {tuple(labels.shape)}"
        )
    extractor, ref = _reference(features)
    feats, logits = extractor(to_uint8(images))
    s = feature_statistics(feats)
    out = {"proxy_fid": frechet_distance(s.mu, s.sigma, ref.mu, ref.sigma)}
    if labels is not None:
        pred = logits.argmax(dim=1).cpu()
        out["proxy_acc"] = float((pred == labels.cpu().long()).float().mean())
    return out
