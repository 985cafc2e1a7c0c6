"""Metrics on features: Fréchet distance, IS, KID, precision/recall, statistics files.

Oracles: closed forms for Gaussians (scipy.linalg.sqrtm in float64), the library's own
FrechetInceptionDistance fed the same features, an explicit unbiased MMD^2, brute-force k-NN.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import scipy.linalg
import torch

from _ranks import run_ranks
from dispersive.errors import UserError
from dispersive.eval.metrics import (
    Statistics,
    feature_statistics,
    frechet_distance,
    inception_score,
    is_statistics_file,
    kernel_inception_distance,
    load_statistics,
    precision_recall,
    save_statistics,
)


def _random_spd(f: int, rng: np.random.Generator) -> np.ndarray:
    a = rng.standard_normal((f, f))
    return a @ a.T / f + 0.1 * np.eye(f)


def _fd_oracle(mu1, s1, mu2, s2) -> float:
    # ||mu1 - mu2||^2 + tr(S1 + S2 - 2 (S1^1/2 S2 S1^1/2)^1/2), all float64.
    r1 = scipy.linalg.sqrtm(s1).real
    cross = scipy.linalg.sqrtm(r1 @ s2 @ r1).real
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1 + s2 - 2 * cross))


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_fd_matches_closed_form_for_gaussians(seed):
    rng = np.random.default_rng(seed)
    f = 12
    mu1, mu2 = rng.standard_normal(f), rng.standard_normal(f)
    s1, s2 = _random_spd(f, rng), _random_spd(f, rng)
    got = frechet_distance(mu1, s1, mu2, s2)
    want = _fd_oracle(mu1, s1, mu2, s2)
    assert got == pytest.approx(want, rel=1e-9, abs=1e-10)
    # Symmetric in its two arguments.
    assert frechet_distance(mu2, s2, mu1, s1) == pytest.approx(want, rel=1e-9, abs=1e-10)


def test_fd_commuting_covariances_exact():
    # Diagonal covariances: FD = ||dmu||^2 + sum (sqrt(a) - sqrt(b))^2 exactly.
    a = np.array([1.0, 4.0, 9.0, 0.25])
    b = np.array([4.0, 1.0, 9.0, 1.0])
    mu1, mu2 = np.zeros(4), np.array([1.0, -2.0, 0.0, 0.5])
    want = (mu2**2).sum() + ((np.sqrt(a) - np.sqrt(b)) ** 2).sum()
    got = frechet_distance(mu1, np.diag(a), mu2, np.diag(b))
    assert got == pytest.approx(want, rel=1e-12)


def test_fd_of_a_set_with_itself_is_zero():
    rng = np.random.default_rng(3)
    feats = torch.from_numpy(rng.standard_normal((300, 16)) @ rng.standard_normal((16, 16)))
    s = feature_statistics(feats)
    fd = frechet_distance(s.mu, s.sigma, s.mu, s.sigma)
    assert abs(fd) < 1e-8 * np.trace(s.sigma)


def test_fd_agrees_with_the_library_on_the_same_features():
    from torchmetrics.image.fid import FrechetInceptionDistance

    class Identity(torch.nn.Module):
        num_features = 8

        def forward(self, x):
            return x

    g = torch.Generator().manual_seed(0)
    real = torch.randn(400, 8, generator=g, dtype=torch.float64)
    fake = 0.8 * torch.randn(300, 8, generator=g, dtype=torch.float64) + 0.3
    lib = FrechetInceptionDistance(feature=Identity())
    lib.update(real, real=True)
    lib.update(fake, real=False)
    want = float(lib.compute())
    sr, sf = feature_statistics(real), feature_statistics(fake)
    got = frechet_distance(sf.mu, sf.sigma, sr.mu, sr.sigma)
    assert got == pytest.approx(want, rel=1e-9)
    assert got == pytest.approx(_fd_oracle(sf.mu, sf.sigma, sr.mu, sr.sigma), rel=1e-9)


def test_fd_rejects_mismatched_feature_sizes():
    with pytest.raises(ValueError, match="shape mismatch"):
        frechet_distance(np.zeros(3), np.eye(3), np.zeros(4), np.eye(4))


def test_feature_statistics_match_numpy_float64():
    rng = np.random.default_rng(4)
    x = rng.standard_normal((50, 5)).astype(np.float32) + 1000.0  # large offset: centring matters
    s = feature_statistics(torch.from_numpy(x))
    x64 = x.astype(np.float64)
    assert s.mu.dtype == np.float64 and s.sigma.dtype == np.float64
    np.testing.assert_allclose(s.mu, x64.mean(0), rtol=1e-12)
    np.testing.assert_allclose(s.sigma, np.cov(x64, rowvar=False), rtol=1e-9, atol=1e-12)
    with pytest.raises(ValueError, match="N >= 2"):
        feature_statistics(torch.zeros(1, 5))


def test_statistics_file_round_trip(tmp_path):
    rng = np.random.default_rng(5)
    s = Statistics(rng.standard_normal(6), _random_spd(6, rng), 123, "fashion-mnist:abc")
    p = tmp_path / "stats.npz"
    save_statistics(p, s)
    assert is_statistics_file(p)
    t = load_statistics(p)
    np.testing.assert_array_equal(t.mu, s.mu)
    np.testing.assert_array_equal(t.sigma, s.sigma)
    assert (t.num, t.features) == (123, "fashion-mnist:abc")
    # An image .npz is not a statistics file, and loading one says what is expected.
    img = tmp_path / "img.npz"
    np.savez(img, arr_0=np.zeros((2, 4, 4, 1), np.uint8))
    assert not is_statistics_file(img)
    with pytest.raises(UserError, match="mu"):
        load_statistics(img)


def test_inception_score_analytic_extremes():
    k, n = 10, 1000
    # Uninformative logits: p(y|x) = p(y) for every x, so IS = 1.
    assert inception_score(torch.zeros(n, k), splits=1)[0] == pytest.approx(1.0, abs=1e-9)
    # Confident, class-balanced predictions: IS = exp(H(p(y))) = K.
    logits = 60.0 * torch.nn.functional.one_hot(torch.arange(n) % k, k).double()
    assert inception_score(logits, splits=1)[0] == pytest.approx(k, rel=1e-9)
    # Reproducible for a seed, with several splits.
    a = inception_score(torch.randn(n, k, generator=torch.Generator().manual_seed(0)), seed=3)
    b = inception_score(torch.randn(n, k, generator=torch.Generator().manual_seed(0)), seed=3)
    assert a == b


def _mmd2_unbiased(x: np.ndarray, y: np.ndarray) -> float:
    d = x.shape[1]
    k = lambda a, b: (a @ b.T / d + 1.0) ** 3  # the KID polynomial kernel
    kxx, kyy, kxy = k(x, x), k(y, y), k(x, y)
    m, n = len(x), len(y)
    return float(
        (kxx.sum() - np.trace(kxx)) / (m * (m - 1))
        + (kyy.sum() - np.trace(kyy)) / (n * (n - 1))
        - 2 * kxy.mean()
    )


def test_kid_matches_explicit_unbiased_mmd():
    rng = np.random.default_rng(6)
    x = rng.standard_normal((60, 4))
    y = rng.standard_normal((60, 4)) + 0.5
    # One subset holding every sample: the estimator is deterministic.
    got, _ = kernel_inception_distance(
        torch.from_numpy(x), torch.from_numpy(y), subsets=1, subset_size=60
    )
    assert got == pytest.approx(_mmd2_unbiased(x, y), rel=1e-9)


def test_kid_near_zero_for_same_distribution_and_larger_for_shift():
    g = torch.Generator().manual_seed(1)
    a, b = torch.randn(400, 8, generator=g), torch.randn(400, 8, generator=g)
    same, _ = kernel_inception_distance(a, b, subsets=20, subset_size=200)
    shifted, _ = kernel_inception_distance(a, b + 1.0, subsets=20, subset_size=200)
    assert abs(same) < 0.02 < shifted


def _pr_bruteforce(real: np.ndarray, fake: np.ndarray, k: int) -> tuple[float, float]:
    def radii(s):
        return np.array([np.sort(np.linalg.norm(s - p, axis=1))[k] for p in s])

    def cover(q, s, r):
        return np.mean([any(np.linalg.norm(s[j] - p) <= r[j] for j in range(len(s))) for p in q])

    return cover(fake, real, radii(real)), cover(real, fake, radii(fake))


def test_precision_recall_matches_bruteforce():
    rng = np.random.default_rng(7)
    real = rng.standard_normal((40, 3))
    fake = 0.5 * rng.standard_normal((30, 3)) + 0.7
    got = precision_recall(torch.from_numpy(real), torch.from_numpy(fake), k=3, chunk=7)
    want = _pr_bruteforce(real, fake, 3)
    assert got == pytest.approx(want, abs=1e-12)


def test_precision_recall_extremes():
    g = torch.Generator().manual_seed(2)
    real = torch.randn(200, 5, generator=g, dtype=torch.float64)
    assert precision_recall(real, real) == (1.0, 1.0)
    assert precision_recall(real, real + 100.0) == (0.0, 0.0)
    # A tight cluster at the centre: all inside the real manifold, covers little of it.
    p, r = precision_recall(real, 0.01 * torch.randn(200, 5, generator=g, dtype=torch.float64))
    assert p == 1.0 and r < 0.5
    with pytest.raises(ValueError, match="more than 3"):
        precision_recall(real[:3], real)


def test_fd_estimate_converges_to_population_value():
    # Large-sample FD between two Gaussian samples approaches the closed form (bias ~ F/N).
    rng = np.random.default_rng(8)
    f, n = 4, 20000
    s1, s2 = _random_spd(f, rng), _random_spd(f, rng)
    mu2 = np.full(f, 0.5)
    x = rng.multivariate_normal(np.zeros(f), s1, size=n)
    y = rng.multivariate_normal(mu2, s2, size=n)
    a, b = feature_statistics(torch.from_numpy(x)), feature_statistics(torch.from_numpy(y))
    want = _fd_oracle(np.zeros(f), s1, mu2, s2)
    assert math.isclose(frechet_distance(a.mu, a.sigma, b.mu, b.sigma), want, rel_tol=0.05)


def _rank_main(rank: int, port: int, result_dir: str) -> None:
    import datetime
    import json
    from pathlib import Path

    import torch.distributed as dist

    dist.init_process_group(
        "gloo",
        init_method=f"tcp://127.0.0.1:{port}",
        rank=rank,
        world_size=2,
        timeout=datetime.timedelta(seconds=30),
    )
    try:
        if rank == 0:  # only rank 0 evaluates, as the training loop's proxy FID does
            g = torch.Generator().manual_seed(0)
            f1, f2 = torch.randn(50, 4, generator=g), torch.randn(50, 4, generator=g) + 1
            a, b = feature_statistics(f1), feature_statistics(f2)
            out = {
                "fd": frechet_distance(a.mu, a.sigma, b.mu, b.sigma),
                "want": _fd_oracle(a.mu, a.sigma, b.mu, b.sigma),
                "kid": kernel_inception_distance(f1, f2, subsets=2, subset_size=20)[0],
                "is": inception_score(f1, splits=2)[0],
            }
            Path(result_dir, "r0.json").write_text(json.dumps(out))
        dist.barrier()
    finally:
        dist.destroy_process_group()


@pytest.mark.distributed
def test_metrics_never_sync_across_ranks(tmp_path):
    # torchmetrics all-gathers states in compute() by default: on one rank of a job that would
    # hang (or sum the states of every rank). Every metric here must stay local.
    import json
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    run_ranks(_rank_main, (port, str(tmp_path)), 2)
    res = json.loads((tmp_path / "r0.json").read_text())
    assert res["fd"] == pytest.approx(res["want"], rel=1e-9)
