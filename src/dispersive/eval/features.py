"""Feature networks for generative metrics: the shipped Fashion-MNIST domain classifier and the
standard FID Inception network (from a local, checksummed weights file).

Both are exposed through :class:`FeatureExtractor`, which maps uint8 images (N, H, W, C) to
float64 features (N, F) for Fréchet/kernel distances and precision/recall, plus float64 class
logits (N, K) for the Inception Score. Weights are always verified by sha256 *before* they are
loaded, and nothing is ever downloaded.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

from dispersive.errors import UserError

__all__ = [
    "ASSETS_DIR",
    "CLASSIFIER_FILE",
    "CLASSIFIER_META",
    "REF_STATS_FILE",
    "INCEPTION_FILENAME",
    "INCEPTION_SHA256",
    "FEATURES",
    "DomainClassifier",
    "FeatureExtractor",
    "sha256_file",
    "verify_sha256",
    "classifier_metadata",
    "load_domain_classifier",
    "load_inception",
    "get_extractor",
]

ASSETS_DIR = Path(__file__).resolve().parent.parent / "assets"
CLASSIFIER_FILE = "fmnist_classifier.pt"  # torch.save of a plain state_dict
CLASSIFIER_META = "fmnist_classifier.json"  # sha256, test accuracy, training command
REF_STATS_FILE = "fmnist_train_stats.npz"  # mu (F,), sigma (F, F) of the training set, float64

# The FID Inception network of pytorch-fid / torch-fidelity (TF "2015-12-05" graph, ported);
# the file name carries the first 8 hex digits of its sha256. 95,628,359 bytes.
INCEPTION_FILENAME = "pt_inception-2015-12-05-6726825d.pth"
INCEPTION_SHA256 = "6726825d0af5f729cebd5821db510b11b1cfad8faad88a03f1befd49fb9129b2"

FEATURES = ("fashion-mnist", "inception")


# ----------------------------------------------------------------------------------------------
# Checksums
# ----------------------------------------------------------------------------------------------


def sha256_file(path: str | Path, *, chunk: int = 1 << 20) -> str:
    """Hex sha256 of a file, read in chunks (weights files can be ~100 MB)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def verify_sha256(path: str | Path | None, expected: str, *, what: str, expected_name: str) -> Path:
    """Check that ``path`` exists and has the sha256 ``expected``; return it as a Path.

    Raises:
        UserError: one line naming the expected file and its checksum when the file is missing
            or its checksum differs.
    """
    if path is None or str(path) == "":
        raise UserError(
            f"{what} weights file is required: pass the local file {expected_name} "
            f"(sha256 {expected}); it is never downloaded"
        )
    p = Path(path).expanduser()
    if not p.is_file():
        raise UserError(
            f"{what} weights file {str(p)!r} not found: expected {expected_name} "
            f"(sha256 {expected})"
        )
    got = sha256_file(p)
    if got != expected.lower():
        raise UserError(
            f"{what} weights file {str(p)!r} has sha256 {got}, expected {expected_name} with "
            f"sha256 {expected}: the file is corrupt or not the right one"
        )
    return p


# ----------------------------------------------------------------------------------------------
# The Fashion-MNIST domain classifier
# ----------------------------------------------------------------------------------------------


class DomainClassifier(nn.Module):
    """A small CNN for 28x28 grayscale images whose penultimate layer serves as features.

    conv(1->16) pool conv(16->32) pool conv(32->64) pool (each conv 3x3 + BatchNorm + ReLU),
    linear(576->F) -> features, ReLU, linear(F->10) -> logits. About 0.1M parameters
    (~0.4 MB as float32), cheap enough to train in minutes on a CPU.

    Features are the *pre-activation* output of the penultimate linear layer: unlike post-ReLU
    values they have no mass at exactly 0, which keeps their covariance well conditioned for the
    Fréchet distance.
    """

    def __init__(self, num_features: int = 128, num_classes: int = 10) -> None:
        super().__init__()
        self.num_features = num_features
        self.num_classes = num_classes

        def block(c_in: int, c_out: int) -> nn.Sequential:
            return nn.Sequential(
                nn.Conv2d(c_in, c_out, 3, padding=1, bias=False),
                nn.BatchNorm2d(c_out),
                nn.ReLU(inplace=True),
                nn.MaxPool2d(2),
            )

        self.body = nn.Sequential(block(1, 16), block(16, 32), block(32, 64))  # (N, 64, 3, 3)
        self.fc = nn.Linear(64 * 3 * 3, num_features)
        self.dropout = nn.Dropout(0.3)
        self.head = nn.Linear(num_features, num_classes)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Features and logits.

        Args:
            x: (N, 1, 28, 28) float images in [-1, 1].

        Returns:
            features (N, F) and class logits (N, 10).
        """
        if x.ndim != 4 or tuple(x.shape[1:]) != (1, 28, 28):
            raise ValueError(
                f"the Fashion-MNIST classifier takes (N, 1, 28, 28) images; got {tuple(x.shape)}"
            )
        f = self.fc(self.body(x).flatten(1))  # (N, F)
        return f, self.head(self.dropout(torch.relu(f)))


def classifier_metadata(assets_dir: str | Path | None = None) -> dict:
    """The JSON metadata shipped beside the classifier weights (sha256, accuracy, command)."""
    meta_path = Path(assets_dir or ASSETS_DIR) / CLASSIFIER_META
    if not meta_path.is_file():
        raise UserError(
            f"domain classifier metadata {str(meta_path)!r} not found; "
            "run `dispersive train-classifier` to create it"
        )
    return json.loads(meta_path.read_text())


_CLASSIFIER_CACHE: dict[tuple[str, str], DomainClassifier] = {}


def load_domain_classifier(
    path: str | Path | None = None, *, sha256: str | None = None
) -> DomainClassifier:
    """Load the domain classifier (eval mode, CPU, float32), verifying its sha256 first.

    Cached per process by (path, sha256): the proxy FID calls this every K training steps.

    Args:
        path: a state_dict file; default the shipped ``assets/fmnist_classifier.pt``.
        sha256: expected checksum; default the one in the metadata JSON beside the file.
    """
    p = Path(path) if path is not None else ASSETS_DIR / CLASSIFIER_FILE
    if sha256 is None:
        meta = classifier_metadata(p.parent)
        sha256 = meta["sha256"]
        num_features = int(meta.get("num_features", 128))
    else:
        num_features = None
    key = (str(p.resolve()), sha256)
    if key in _CLASSIFIER_CACHE:
        return _CLASSIFIER_CACHE[key]
    verify_sha256(p, sha256, what="domain classifier", expected_name=p.name)
    state = torch.load(p, map_location="cpu", weights_only=True)
    if num_features is None:
        num_features = int(state["fc.weight"].shape[0])
    net = DomainClassifier(num_features=num_features)
    net.load_state_dict(state)
    net.eval().requires_grad_(False)
    _CLASSIFIER_CACHE[key] = net
    return net


# ----------------------------------------------------------------------------------------------
# The FID Inception network (through torch-fidelity)
# ----------------------------------------------------------------------------------------------


def load_inception(weights_path: str | Path | None, *, sha256: str = INCEPTION_SHA256) -> nn.Module:
    """The standard FID Inception-v3 from a local weights file, through torch-fidelity.

    The checksum is verified first (so a missing or wrong file is reported even where
    torch-fidelity is not installed). The returned module maps uint8 (N, 3, H, W) images to a
    tuple (pool3 features (N, 2048), unbiased logits (N, 1008)); it resizes to 299 internally.

    Raises:
        UserError: missing/corrupt weights file, or torch-fidelity not importable.
    """
    p = verify_sha256(weights_path, sha256, what="Inception", expected_name=INCEPTION_FILENAME)
    try:
        from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3
    except ImportError as e:
        raise UserError(
            "--features inception needs torch-fidelity: `pip install torch-fidelity` "
            f"(it requires torchvision); import failed: {e}"
        ) from None
    net = FeatureExtractorInceptionV3(
        name="inception-v3-compat",
        features_list=["2048", "logits_unbiased"],
        feature_extractor_weights_path=str(p),
    )
    return net.eval().requires_grad_(False)


# ----------------------------------------------------------------------------------------------
# A common interface: uint8 NHWC -> float64 features and logits
# ----------------------------------------------------------------------------------------------


@dataclass
class FeatureExtractor:
    """Maps uint8 images (N, H, W, C) to float64 (features (N, F), logits (N, K)).

    Attributes:
        name: "fashion-mnist" or "inception".
        id: identifies the network and its weights (name + sha256 prefix); saved in statistics
            files so statistics from different networks are never compared.
        num_features: F.
        fn: a batch function uint8 (B, H, W, C) array -> (features (B, F), logits (B, K)).
    """

    name: str
    id: str
    num_features: int
    fn: Callable[[np.ndarray], tuple[Tensor, Tensor]]

    @torch.no_grad()
    def __call__(self, images: np.ndarray, *, batch_size: int = 500) -> tuple[Tensor, Tensor]:
        if not (isinstance(images, np.ndarray) and images.dtype == np.uint8 and images.ndim == 4):
            raise ValueError("images must be a uint8 array of shape (N, H, W, C)")
        feats, logits = [], []
        for i in range(0, images.shape[0], batch_size):
            f, lg = self.fn(images[i : i + batch_size])
            feats.append(f.double())
            logits.append(lg.double())
        if not feats:
            raise ValueError("no images to extract features from (N = 0)")
        return torch.cat(feats), torch.cat(logits)


def _uint8_to_unit(images: np.ndarray) -> Tensor:
    """uint8 (B, H, W, C) -> float32 (B, C, H, W) in [-1, 1] (the inverse of io.to_uint8)."""
    x = torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float()
    return x / 127.5 - 1.0


def _fashion_mnist_extractor(weights: str | Path | None = None) -> FeatureExtractor:
    net = load_domain_classifier(weights)

    def fn(images: np.ndarray) -> tuple[Tensor, Tensor]:
        if images.shape[1:3] != (28, 28):
            raise UserError(
                f"--features fashion-mnist needs 28x28 images; got {images.shape[1]}x"
                f"{images.shape[2]} (use --features inception for other image sizes)"
            )
        if images.shape[3] == 3:
            # RGB files with equal channels (grayscale replicated for the ADM evaluator) are fine.
            if not (
                np.array_equal(images[..., 0], images[..., 1])
                and np.array_equal(images[..., 0], images[..., 2])
            ):
                raise UserError(
                    "--features fashion-mnist needs grayscale images; got RGB images with "
                    "different channels"
                )
            images = images[..., :1]
        return net(_uint8_to_unit(images))

    sha = sha256_file(ASSETS_DIR / CLASSIFIER_FILE) if weights is None else sha256_file(weights)
    return FeatureExtractor("fashion-mnist", f"fashion-mnist:{sha[:16]}", net.num_features, fn)


def _inception_extractor(weights: str | Path | None) -> FeatureExtractor:
    net = load_inception(weights)

    def fn(images: np.ndarray) -> tuple[Tensor, Tensor]:
        x = torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2)  # uint8 NCHW
        if x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1)  # grayscale replicated to RGB, as the network expects
        feats, logits = net(x.contiguous())
        return feats.reshape(x.shape[0], -1), logits.reshape(x.shape[0], -1)

    return FeatureExtractor("inception", f"inception:{INCEPTION_SHA256[:16]}", 2048, fn)


def get_extractor(
    name: str, *, inception_weights: str | Path | None = None, classifier_weights=None
) -> FeatureExtractor:
    """Build a feature extractor by name ("fashion-mnist" or "inception")."""
    if name == "fashion-mnist":
        return _fashion_mnist_extractor(classifier_weights)
    if name == "inception":
        return _inception_extractor(inception_weights)
    raise UserError(f"unknown features {name!r}; valid choices: {', '.join(FEATURES)}")
