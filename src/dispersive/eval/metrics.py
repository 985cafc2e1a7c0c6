"""Generative metrics on precomputed features: Fréchet distance, Inception Score, KID,
improved precision/recall; feature statistics files.

FID, IS and KID go through torchmetrics (``FrechetInceptionDistance``,
``InceptionScore``, ``KernelInceptionDistance``) with a pass-through feature module, so the
network runs once per image set and each metric sees the same float64 features. torchmetrics
1.9 has no precision/recall for generative models, so :func:`precision_recall` implements
Kynkäänniemi et al. (2019) here (k-NN radii, float64 distances in chunks).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

from dispersive.atomic import atomic_write
from dispersive.errors import UserError

__all__ = [
    "METRICS",
    "METRIC_INFO",
    "METRIC_KEYS",
    "EVAL_KEYS",
    "Metric",
    "evaluate",
    "Statistics",
    "feature_statistics",
    "save_statistics",
    "load_statistics",
    "is_statistics_file",
    "frechet_distance",
    "inception_score",
    "kernel_inception_distance",
    "precision_recall",
]


@dataclass
class Statistics:
    """Mean and covariance of a feature set, float64.

    Attributes:
        mu: (F,) mean.
        sigma: (F, F) unbiased covariance (divided by N - 1).
        num: N, the number of images.
        features: the feature extractor's id (network + weights), e.g. "fashion-mnist:ab12...".
    """

    mu: np.ndarray
    sigma: np.ndarray
    num: int
    features: str


def feature_statistics(features: Tensor | np.ndarray, *, features_id: str = "") -> Statistics:
    """Float64 mean (F,) and unbiased covariance (F, F) of features (N, F), N >= 2."""
    f = torch.as_tensor(features).double()
    if f.ndim != 2 or f.shape[0] < 2:
        raise ValueError(f"features must be (N, F) with N >= 2; got {tuple(f.shape)}")
    mu = f.mean(0)
    fc = f - mu  # centre first: avoids the cancellation of E[ff^T] - mu mu^T
    sigma = fc.T @ fc / (f.shape[0] - 1)
    return Statistics(mu.numpy(), sigma.numpy(), int(f.shape[0]), features_id)


def save_statistics(path: str | Path, stats: Statistics) -> None:
    """Write statistics as an .npz (``mu``, ``sigma``, ``num``, ``features``); no pickles."""
    arrays = {
        "mu": stats.mu.astype(np.float64),
        "sigma": stats.sigma.astype(np.float64),
        "num": np.int64(stats.num),
        "features": np.str_(stats.features),
    }
    atomic_write(path, lambda f: np.savez(f, **arrays))


def is_statistics_file(path: str | Path) -> bool:
    """True for an .npz holding ``mu`` and ``sigma`` (a statistics file, not images)."""
    p = Path(path)
    if not (p.is_file() and p.suffix == ".npz"):
        return False
    try:
        with np.load(p, allow_pickle=False) as z:
            return "mu" in z.files and "sigma" in z.files
    except (OSError, ValueError):
        return False


def load_statistics(path: str | Path) -> Statistics:
    """Read a statistics .npz written by :func:`save_statistics` (``allow_pickle=False``)."""
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"statistics file {str(p)!r} not found")
    try:
        with np.load(p, allow_pickle=False) as z:
            mu = np.asarray(z["mu"], dtype=np.float64)
            sigma = np.asarray(z["sigma"], dtype=np.float64)
            num = int(z["num"]) if "num" in z.files else 0
            feats = str(z["features"]) if "features" in z.files else ""
    except (KeyError, ValueError, OSError) as e:
        raise UserError(
            f"{str(p)!r} is not a statistics file (an .npz with float arrays mu (F,) and "
            f"sigma (F, F)): {e}"
        ) from None
    if mu.ndim != 1 or sigma.shape != (mu.shape[0], mu.shape[0]):
        raise UserError(
            f"statistics file {str(p)!r}: mu must be (F,) and sigma (F, F); "
            f"got {mu.shape} and {sigma.shape}"
        )
    return Statistics(mu, sigma, num, feats)


# Never all-gather metric states: these functions may run on one rank of a DDP job (the proxy
# FID), where a collective would hang, and the states here are already complete per process.
_LOCAL = {"sync_on_compute": False}


class _Precomputed(nn.Module):
    """Pass-through "feature network": the metrics receive features, not images."""

    def __init__(self, num_features: int) -> None:
        super().__init__()
        self.num_features = num_features

    def forward(self, x: Tensor) -> Tensor:
        return x.double()


def frechet_distance(
    mu1: np.ndarray | Tensor,
    sigma1: np.ndarray | Tensor,
    mu2: np.ndarray | Tensor,
    sigma2: np.ndarray | Tensor,
) -> float:
    """Fréchet distance between N(mu1, sigma1) and N(mu2, sigma2), in float64.

    ``||mu1 - mu2||^2 + tr(sigma1 + sigma2 - 2 (sigma1 sigma2)^(1/2))``, computed by torchmetrics'
    FrechetInceptionDistance: its float64 sum states are set from the given moments (with
    N = 2, which reproduces mu and sigma exactly up to rounding), then ``compute()``.

    Args:
        mu1, mu2: (F,) means. sigma1, sigma2: (F, F) covariances.
    """
    from torchmetrics.image.fid import FrechetInceptionDistance

    m1, m2 = (torch.as_tensor(m, dtype=torch.float64) for m in (mu1, mu2))
    s1, s2 = (torch.as_tensor(s, dtype=torch.float64) for s in (sigma1, sigma2))
    f = m1.shape[0]
    if m2.shape != (f,) or s1.shape != (f, f) or s2.shape != (f, f):
        raise ValueError(
            f"shape mismatch: mu1 {tuple(m1.shape)}, sigma1 {tuple(s1.shape)}, "
            f"mu2 {tuple(m2.shape)}, sigma2 {tuple(s2.shape)}; statistics from different "
            "feature networks cannot be compared"
        )
    metric = FrechetInceptionDistance(feature=_Precomputed(f), **_LOCAL)
    n = 2
    # The metric keeps sum_i f_i and sum_i f_i f_i^T; cov = (S - n mu mu^T) / (n - 1).
    metric.real_features_sum = n * m1
    metric.real_features_cov_sum = (n - 1) * s1 + n * torch.outer(m1, m1)
    metric.real_features_num_samples = torch.tensor(n)
    metric.fake_features_sum = n * m2
    metric.fake_features_cov_sum = (n - 1) * s2 + n * torch.outer(m2, m2)
    metric.fake_features_num_samples = torch.tensor(n)
    metric.orig_dtype = torch.float64
    with warnings.catch_warnings():
        # "compute called before update": the states were set directly, which is intended.
        warnings.simplefilter("ignore")
        return float(metric.compute())


def inception_score(logits: Tensor, *, splits: int = 10, seed: int = 0) -> tuple[float, float]:
    """Inception Score (mean, std over splits) from class logits (N, K), via torchmetrics.

    The split assignment uses torch's global RNG inside torchmetrics; it is seeded here in a
    forked RNG state so results are reproducible and the caller's RNG is untouched.
    """
    from torchmetrics.image.inception import InceptionScore

    if logits.ndim != 2 or logits.shape[0] < splits:
        raise ValueError(f"logits must be (N, K) with N >= splits={splits}; got {logits.shape}")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "will save all extracted features in buffer"
        metric = InceptionScore(feature=_Precomputed(logits.shape[1]), splits=splits, **_LOCAL)
    metric.update(logits.double())
    with torch.random.fork_rng(devices=[]), warnings.catch_warnings():
        torch.manual_seed(seed)
        warnings.simplefilter("ignore")  # std over a single split is nan, with a warning
        mean, std = metric.compute()
    return float(mean), float(std)


def kernel_inception_distance(
    real: Tensor,
    fake: Tensor,
    *,
    subsets: int = 100,
    subset_size: int = 1000,
    seed: int = 0,
) -> tuple[float, float]:
    """KID (mean, std over subsets): polynomial-kernel MMD^2 (degree 3) via torchmetrics.

    ``subset_size`` is capped at the smaller set size.

    Args:
        real: (N1, F) features. fake: (N2, F) features.
    """
    from torchmetrics.image.kid import KernelInceptionDistance

    if real.ndim != 2 or fake.ndim != 2 or real.shape[1] != fake.shape[1]:
        raise ValueError(f"features must be (N, F) with equal F; got {real.shape}, {fake.shape}")
    size = min(subset_size, real.shape[0], fake.shape[0])
    if size < 2:
        raise ValueError("KID needs at least 2 images in each set")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        metric = KernelInceptionDistance(
            feature=_Precomputed(real.shape[1]), subsets=subsets, subset_size=size, **_LOCAL
        )
    metric.update(real.double(), real=True)
    metric.update(fake.double(), real=False)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        mean, std = metric.compute()
    return float(mean), float(std)


def _knn_radii(f: Tensor, k: int, chunk: int) -> Tensor:
    """Distance from each row of f (N, F) to its k-th nearest other row, float64 (N,)."""
    radii = []
    for i in range(0, f.shape[0], chunk):
        d = torch.cdist(f[i : i + chunk], f)  # (c, N); the point itself is at distance 0
        radii.append(d.topk(k + 1, dim=1, largest=False).values[:, k])
    return torch.cat(radii)


def precision_recall(
    real: Tensor, fake: Tensor, *, k: int = 3, chunk: int = 1000
) -> tuple[float, float]:
    """Improved precision and recall (Kynkäänniemi et al., 2019) with k-NN manifolds.

    Precision: share of fake samples inside the real manifold (union of balls around each real
    feature with radius = distance to its k-th nearest real neighbour). Recall: share of real
    samples inside the fake manifold. Distances in float64, computed in chunks of rows.

    Args:
        real: (N1, F) features. fake: (N2, F) features. k: neighbourhood size (paper: 3).
    """
    if real.ndim != 2 or fake.ndim != 2 or real.shape[1] != fake.shape[1]:
        raise ValueError(f"features must be (N, F) with equal F; got {real.shape}, {fake.shape}")
    if min(real.shape[0], fake.shape[0]) <= k:
        raise ValueError(f"precision/recall with k={k} needs more than {k} images in each set")
    r, f = real.double(), fake.double()
    r_radii = _knn_radii(r, k, chunk)  # (N1,)
    f_radii = _knn_radii(f, k, chunk)  # (N2,)
    # One pass over the fake-real distances serves both directions.
    fake_inside = 0
    real_inside = torch.zeros(r.shape[0], dtype=torch.bool)
    for i in range(0, f.shape[0], chunk):
        d = torch.cdist(f[i : i + chunk], r)  # (c, N1)
        fake_inside += int((d <= r_radii[None, :]).any(dim=1).sum())
        real_inside |= (d <= f_radii[i : i + chunk, None]).any(dim=0)
    return fake_inside / f.shape[0], float(real_inside.double().mean())


# ----------------------------------------------------------------------------------------------
# Everything at once: what `dispersive eval` runs
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Metric:
    """A reported number: how tables name it and which direction is better."""

    label: str
    higher_is_better: bool


#: Every metric a run or an evaluation reports, by its key in the results: what
#: :func:`evaluate` returns and the in-training proxy (:mod:`dispersive.eval.proxy`).
#: A new metric is added here (and computed in :func:`evaluate`); the CLI, the experiment
#: results and the report read it from here.
METRIC_INFO: dict[str, Metric] = {
    "fid": Metric("FID", False),
    "is": Metric("IS", True),
    "kid": Metric("KID", False),
    "precision": Metric("precision", True),
    "recall": Metric("recall", True),
    "proxy_fid": Metric("proxy FID", False),
    "proxy_acc": Metric("class acc.", True),
}
#: The ``metrics`` :func:`evaluate` can compute (``dispersive eval --metrics``) -> result keys.
METRIC_KEYS: dict[str, tuple[str, ...]] = {
    "fid": ("fid",),
    "is": ("is",),
    "kid": ("kid",),
    "pr": ("precision", "recall"),
}
METRICS = tuple(METRIC_KEYS)
#: The result keys of :func:`evaluate`, in order.
EVAL_KEYS = tuple(k for keys in METRIC_KEYS.values() for k in keys)


def evaluate(
    samples: str | Path | np.ndarray,
    ref: str | Path | np.ndarray | None = None,
    *,
    features: str = "fashion-mnist",
    inception_weights: str | Path | None = None,
    metrics: tuple[str, ...] = METRICS,
    batch_size: int = 500,
    kid_subsets: int = 100,
    kid_subset_size: int = 1000,
    is_splits: int = 10,
    pr_k: int = 3,
    seed: int = 0,
    save_stats: str | Path | None = None,
) -> dict:
    """Compute generative metrics of a sample set against a reference.

    Args:
        samples: an .npz (``arr_0`` uint8 NHWC), an image folder, or a uint8 array (N, H, W, C).
        ref: the same kinds, or a statistics .npz (``mu``, ``sigma``; then only FID and IS are
            computed, since KID and precision/recall need the reference features themselves).
            ``None`` with ``features="fashion-mnist"`` uses the shipped training-set statistics.
        features: "fashion-mnist" (shipped domain classifier) or "inception" (needs
            ``inception_weights``, a local file verified by sha256).
        metrics: a subset of :data:`METRICS` ("fid", "is", "kid", "pr").
        save_stats: if given, also write the samples' feature statistics there.

    Returns:
        A JSON-able dict: ``fid`` and, where computed, ``is``/``is_std``, ``kid``/``kid_std``,
        ``precision``/``recall``, plus what produced them (features id, counts, library).
    """
    import time

    import torchmetrics

    from dispersive.eval.features import ASSETS_DIR, REF_STATS_FILE, get_extractor
    from dispersive.eval.io import load_images

    unknown = set(metrics) - set(METRICS)
    if unknown:
        raise UserError(f"unknown metrics {sorted(unknown)}; valid: {', '.join(METRICS)}")
    t0 = time.time()
    extractor = get_extractor(features, inception_weights=inception_weights)
    x = samples if isinstance(samples, np.ndarray) else load_images(samples)
    f_fake, logits = extractor(x, batch_size=batch_size)
    out: dict = {"features": extractor.id, "num_samples": int(x.shape[0])}
    out["samples"] = "<array>" if isinstance(samples, np.ndarray) else str(samples)
    if save_stats:
        save_statistics(save_stats, feature_statistics(f_fake, features_id=extractor.id))

    if ref is None:
        if features != "fashion-mnist":
            raise UserError(f"--ref is required with --features {features}")
        ref = ASSETS_DIR / REF_STATS_FILE
    f_real = None
    if not isinstance(ref, np.ndarray) and is_statistics_file(ref):
        ref_stats = load_statistics(ref)
        if ref_stats.features and ref_stats.features != extractor.id:
            raise UserError(
                f"reference statistics {str(ref)!r} were computed with features "
                f"{ref_stats.features!r}, not {extractor.id!r}: use statistics from the same "
                "network (or recompute them with --save-stats)"
            )
        out["num_ref"] = ref_stats.num
    else:
        xr = ref if isinstance(ref, np.ndarray) else load_images(ref)
        f_real, _ = extractor(xr, batch_size=batch_size)
        ref_stats = feature_statistics(f_real, features_id=extractor.id)
        out["num_ref"] = int(xr.shape[0])
    out["ref"] = "<array>" if isinstance(ref, np.ndarray) else str(ref)

    if "fid" in metrics:
        s = feature_statistics(f_fake)
        out["fid"] = frechet_distance(s.mu, s.sigma, ref_stats.mu, ref_stats.sigma)
    if "is" in metrics:
        splits = min(is_splits, x.shape[0])
        out["is"], out["is_std"] = inception_score(logits, splits=splits, seed=seed)
    skipped = []
    if "kid" in metrics:
        if f_real is None:
            skipped.append("kid")
        else:
            out["kid"], out["kid_std"] = kernel_inception_distance(
                f_real, f_fake, subsets=kid_subsets, subset_size=kid_subset_size, seed=seed
            )
    if "pr" in metrics:
        if f_real is None:
            skipped.append("precision/recall")
        else:
            out["precision"], out["recall"] = precision_recall(f_real, f_fake, k=pr_k)
            out["pr_k"] = pr_k
    if skipped:
        out["skipped"] = f"{', '.join(skipped)}: need reference images, not statistics"
    out["library"] = f"torchmetrics {torchmetrics.__version__} (FID, IS, KID); P/R: dispersive"
    out["seconds"] = round(time.time() - t0, 2)
    return out
