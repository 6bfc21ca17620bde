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
        raise ValueError(
            f"expected two uint8 [N, H, W, 3] arrays of one shape; got "
            f"{images.shape} and {truth.shape}"
        )
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


def ssim_index(x: torch.Tensor, y: torch.Tensor, data_range: float) -> torch.Tensor:
    """Mean SSIM ``[N]`` of float images ``[N, C, H, W]`` (differentiable: also a training loss).

    Values are centred on the middle of the range first, so the (co)variances lose less to
    float32 cancellation; images smaller than the window are compared whole.
    """
    if min(x.shape[2:]) < _WINDOW:
        x, y = (functional.interpolate(t, size=(_WINDOW, _WINDOW), mode="nearest") for t in (x, y))
    window = _gaussian_kernel().to(x.device)
    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    middle = data_range / 2
    x, y = x - middle, y - middle
    # One filter call over the five maps (about 2x faster than five calls on a CPU).
    mu_x, mu_y, xx, yy, xy = _blur(torch.cat([x, y, x * x, y * y, x * y], 1), window).chunk(5, 1)
    var_x, var_y, cov = xx - mu_x**2, yy - mu_y**2, xy - mu_x * mu_y
    mu_x, mu_y = mu_x + middle, mu_y + middle
    index = ((2 * mu_x * mu_y + c1) * (2 * cov + c2)) / (
        (mu_x**2 + mu_y**2 + c1) * (var_x + var_y + c2)
    )
    return index.flatten(1).mean(1)


def ssim(images: np.ndarray, truth: np.ndarray) -> np.ndarray:
    """Mean SSIM of each uint8 image, ``[N]``."""
    x, y = (t.permute(0, 3, 1, 2).float() for t in _pair(images, truth))  # [N, 3, H, W]
    return ssim_index(x, y, 255.0).double().numpy()
