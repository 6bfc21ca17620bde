"""Full-reference image quality of a view against the true view: PSNR and SSIM.

Both work on uint8 RGB images ``[N, H, W, 3]`` (data range 255) and return one value per
image. SSIM is Wang et al. (2004): an 11x11 Gaussian window (sigma 1.5, applied separably in
float32), K1 = 0.01, K2 = 0.03, computed per channel on the valid region and averaged.
"""

import numpy as np
import torch
from torch.nn import functional

PSNR_CAP_DB = 100.0  # identical images (MSE 0) count as this, so means stay finite
_WINDOW, _SIGMA = 11, 1.5


def _pair(images: np.ndarray, truth: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    if images.shape != truth.shape or images.ndim != 4 or images.shape[-1] != 3:
        raise ValueError(f"expected two uint8 [N, H, W, 3] arrays of one shape; got "
                         f"{images.shape} and {truth.shape}")
    return _as_double(images), _as_double(truth)


def _as_double(array: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(array)).double()


def _blur(x: torch.Tensor, kernel: torch.Tensor) -> torch.Tensor:
    """Separable Gaussian filter over the valid region, per channel."""
    channels = x.shape[1]
    rows = kernel.view(1, 1, -1, 1).expand(channels, 1, -1, 1)
    cols = kernel.view(1, 1, 1, -1).expand(channels, 1, 1, -1)
    return functional.conv2d(functional.conv2d(x, rows, groups=channels), cols, groups=channels)


def psnr(images: np.ndarray, truth: np.ndarray) -> np.ndarray:
    """PSNR in dB of each image, ``[N]`` (capped at ``PSNR_CAP_DB``)."""
    x, y = _pair(images, truth)
    mse = ((x - y) ** 2).flatten(1).mean(1)
    with np.errstate(divide="ignore"):
        values = 10.0 * np.log10(255.0**2 / mse.numpy())
    return np.minimum(values, PSNR_CAP_DB)


def _gaussian_kernel() -> torch.Tensor:
    offsets = torch.arange(_WINDOW, dtype=torch.float64) - (_WINDOW - 1) / 2
    kernel = torch.exp(-(offsets**2) / (2 * _SIGMA**2))
    return (kernel / kernel.sum()).float()


def ssim(images: np.ndarray, truth: np.ndarray) -> np.ndarray:
    """Mean SSIM of each image, ``[N]``; images smaller than the window are compared whole."""
    x, y = (t.permute(0, 3, 1, 2).float() for t in _pair(images, truth))  # [N, 3, H, W]
    if min(x.shape[2:]) < _WINDOW:
        x, y = (functional.interpolate(t, size=(_WINDOW, _WINDOW), mode="nearest") for t in (x, y))
    window = _gaussian_kernel()
    c1, c2 = (0.01 * 255) ** 2, (0.03 * 255) ** 2
    x, y = x - 127.5, y - 127.5  # centred: (co)variances lose less to float32 cancellation
    mu_x, mu_y = _blur(x, window), _blur(y, window)
    var_x = _blur(x * x, window) - mu_x**2
    var_y = _blur(y * y, window) - mu_y**2
    cov = _blur(x * y, window) - mu_x * mu_y
    mu_x, mu_y = mu_x + 127.5, mu_y + 127.5
    index = ((2 * mu_x * mu_y + c1) * (2 * cov + c2)) / ((mu_x**2 + mu_y**2 + c1)
                                                         * (var_x + var_y + c2))
    return index.flatten(1).double().mean(1).numpy()
