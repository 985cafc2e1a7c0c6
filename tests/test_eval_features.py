"""Feature networks: the shipped Fashion-MNIST classifier, checksums, the proxy FID, and whether
the domain features rank real > blurred > noise images as they should."""

from __future__ import annotations

import functools
import json

import numpy as np
import pytest
import torch

from dispersive.errors import UserError
from dispersive.eval import features as F
from dispersive.eval.metrics import feature_statistics, frechet_distance, load_statistics

DATA = "/usr/share/datasets/fashion-mnist"


@functools.lru_cache(maxsize=1)
def _test_set() -> tuple[np.ndarray, np.ndarray]:
    from dispersive.data.datasets import load_fashion_mnist

    return load_fashion_mnist(DATA, train=False)


def _test_images(n: int) -> np.ndarray:
    try:
        x, _ = _test_set()
    except (ImportError, UserError, FileNotFoundError) as e:
        pytest.skip(f"Fashion-MNIST test set unavailable: {e}")
    return x[:n, :, :, None]  # uint8 (n, 28, 28, 1)


def _blur(u: np.ndarray, sigma: float = 1.0) -> np.ndarray:
    # Separable Gaussian blur in float, back to uint8.
    r = np.arange(-3, 4)
    k = np.exp(-(r**2) / (2 * sigma**2))
    k = torch.tensor(k / k.sum(), dtype=torch.float32)
    x = torch.from_numpy(u[..., 0].astype(np.float32))[:, None]
    x = torch.nn.functional.conv2d(x, k.view(1, 1, 1, 7), padding=(0, 3))
    x = torch.nn.functional.conv2d(x, k.view(1, 1, 7, 1), padding=(3, 0))
    return x[:, 0, :, :, None].round().clamp(0, 255).to(torch.uint8).numpy()


def test_shipped_classifier_matches_its_metadata():
    meta = F.classifier_metadata()
    path = F.ASSETS_DIR / F.CLASSIFIER_FILE
    assert F.sha256_file(path) == meta["sha256"]
    assert path.stat().st_size < 2 * 1024 * 1024  # "well under 2 MB"
    assert meta["test_accuracy"] >= 0.90 and "train-classifier" in meta["command"]
    net = F.load_domain_classifier()
    assert net is F.load_domain_classifier()  # cached per process
    feats, logits = net(torch.zeros(3, 1, 28, 28))
    assert feats.shape == (3, meta["num_features"]) and logits.shape == (3, 10)
    stats = load_statistics(F.ASSETS_DIR / F.REF_STATS_FILE)
    assert stats.mu.shape == (meta["num_features"],) and stats.num == 60000
    assert stats.features == f"fashion-mnist:{meta['sha256'][:16]}"
    np.testing.assert_allclose(stats.sigma, stats.sigma.T)
    assert np.linalg.eigvalsh(stats.sigma).min() > -1e-9  # a covariance


def test_shipped_classifier_accuracy_on_held_out_images():
    x = _test_images(2000)
    _, y = _test_set()
    ex = F.get_extractor("fashion-mnist")
    _, logits = ex(x)
    acc = float((logits.argmax(1).numpy() == y[:2000]).mean())
    assert acc >= 0.88, acc


def test_domain_features_rank_real_blur_noise():
    x = _test_images(1000)
    ex = F.get_extractor("fashion-mnist")
    ref = load_statistics(F.ASSETS_DIR / F.REF_STATS_FILE)

    def fd(u):
        s = feature_statistics(ex(u)[0])
        return frechet_distance(s.mu, s.sigma, ref.mu, ref.sigma)

    noise = np.random.default_rng(0).integers(0, 256, x.shape, dtype=np.uint8)
    d_real, d_blur, d_noise = fd(x), fd(_blur(x)), fd(noise)
    print(
        f"\nFD to train stats (1000 test images): real {d_real:.3f}  blur {d_blur:.3f}  "
        f"noise {d_noise:.3f}"
    )
    assert 5 * d_real < d_blur < d_noise


def test_sha256_errors_are_one_line_and_name_the_file(tmp_path):
    with pytest.raises(UserError) as e:
        F.verify_sha256(tmp_path / "nope.pth", "ab" * 32, what="X", expected_name="x.pth")
    msg = str(e.value)
    assert "\n" not in msg and "x.pth" in msg and "ab" * 32 in msg and "not found" in msg
    bad = tmp_path / "x.pth"
    bad.write_bytes(b"corrupt")
    with pytest.raises(UserError, match="has sha256 .* expected x.pth") as e:
        F.verify_sha256(bad, "ab" * 32, what="X", expected_name="x.pth")
    assert "\n" not in str(e.value)
    assert F.verify_sha256(bad, F.sha256_file(bad), what="X", expected_name="x.pth") == bad


def test_inception_checksum_is_checked_before_anything_else(tmp_path):
    fake = tmp_path / F.INCEPTION_FILENAME
    fake.write_bytes(b"\0" * 1000)
    with pytest.raises(UserError, match=F.INCEPTION_SHA256):
        F.load_inception(fake)
    with pytest.raises(UserError, match=F.INCEPTION_FILENAME):
        F.load_inception(None)
    assert F.INCEPTION_SHA256.startswith(F.INCEPTION_FILENAME.split("-")[-1][:8])


def test_corrupt_classifier_is_refused(tmp_path):
    src = F.ASSETS_DIR / F.CLASSIFIER_FILE
    meta = F.classifier_metadata()
    bad = tmp_path / F.CLASSIFIER_FILE
    data = bytearray(src.read_bytes())
    data[len(data) // 2] ^= 0xFF
    bad.write_bytes(bytes(data))
    (tmp_path / F.CLASSIFIER_META).write_text(json.dumps(meta))
    with pytest.raises(UserError, match="sha256"):
        F.load_domain_classifier(bad)


def test_fashion_mnist_features_check_the_image_size():
    ex = F.get_extractor("fashion-mnist")
    with pytest.raises(UserError, match="28x28"):
        ex(np.zeros((2, 32, 32, 1), np.uint8))
    with pytest.raises(UserError, match="grayscale"):
        ex(np.random.default_rng(0).integers(0, 255, (2, 28, 28, 3), dtype=np.uint8))
    # Grayscale replicated to RGB is accepted and gives the same features.
    g = np.random.default_rng(1).integers(0, 255, (2, 28, 28, 1), dtype=np.uint8)
    torch.testing.assert_close(ex(g)[0], ex(np.repeat(g, 3, axis=-1))[0])


def test_proxy_fid_equals_eval_on_the_same_images():
    from dispersive.eval.io import from_uint8
    from dispersive.eval.metrics import evaluate
    from dispersive.eval.proxy import proxy_fid

    x = _test_images(500)
    images = from_uint8(x) + 0.001  # off the uint8 grid: the proxy quantises like sample files
    got = proxy_fid(images)
    want = evaluate(x, None, metrics=("fid",))["fid"]
    assert got == pytest.approx(want, rel=1e-9)
    with pytest.raises(ValueError, match=r"\(N, 1, 28, 28\)"):
        proxy_fid(torch.zeros(4, 3, 28, 28))
    with pytest.raises(UserError, match="fashion-mnist"):
        proxy_fid(images, features="inception")


def test_proxy_accuracy_is_the_classifiers_agreement_with_the_labels():
    from dispersive.eval.io import from_uint8
    from dispersive.eval.proxy import proxy_metrics

    try:
        x, y = _test_set()
    except (ImportError, UserError, FileNotFoundError) as e:
        pytest.skip(f"Fashion-MNIST test set unavailable: {e}")
    images, labels = from_uint8(x[:1000, :, :, None]), torch.as_tensor(y[:1000]).long()
    right = proxy_metrics(images, labels)
    wrong = proxy_metrics(images, (labels + 1) % 10)
    assert right["proxy_acc"] >= 0.88  # the shipped network's test accuracy is above 90%
    assert wrong["proxy_acc"] <= 0.12
    assert right["proxy_fid"] == wrong["proxy_fid"]  # labels do not enter the distance
    assert "proxy_acc" not in proxy_metrics(images)
    with pytest.raises(ValueError, match="one per image"):
        proxy_metrics(images, labels[:10])
