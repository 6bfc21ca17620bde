"""One sample against the K-sample posterior mean: imputed-view PSNR/SSIM against sharpness.

The receiver delivers the first of ``--samples K`` samples, or with ``--posterior-mean`` their
mean. For every pattern of missing views (each camera alone, each pair), held-out frame sets
are imputed once with K samples by the receiver's ``Imputer``; the means of the first 1, 2,
4, ... samples are decoded with its ``LatentDecoder`` and scored against the true views: PSNR
and SSIM (higher is closer), and sharpness, the mean squared Laplacian of the grey image as a
fraction of the true views' (1 = as much fine detail as the truth).

Usage: ``python bench/bench_posterior_mean.py --data /tmp/held_k [--model DIR] [--frames 240]
[--samples 4] [--out bench/results/posterior_mean.json]``.
"""

from __future__ import annotations

import argparse
import itertools
import json
import time
from pathlib import Path

import numpy as np
import torch

from mvld.common.default_model import DEFAULT_MODEL
from mvld.hardware import cpu_name
from mvld.model.checkpoint import load_mvld_model
from mvld.receiver.decoder import LatentDecoder
from mvld.receiver.imputation import Imputer
from mvld.train.image_quality import psnr, ssim
from mvld.train.latents import encode_complete_frame_sets

LAPLACIAN = torch.tensor([[0.0, 1.0, 0.0], [1.0, -4.0, 1.0], [0.0, 1.0, 0.0]])


def laplacian_energy(images: np.ndarray) -> float:
    """Mean squared Laplacian of uint8 RGB ``[N, H, W, 3]`` images in grey, 0..1 units."""
    grey = torch.from_numpy(images.astype(np.float32) / 255.0).mean(-1, keepdim=True)
    response = torch.nn.functional.conv2d(grey.permute(0, 3, 1, 2), LAPLACIAN[None, None])
    return float(response.pow(2).mean())


def score(
    model, decode: LatentDecoder, latents: torch.Tensor, images: np.ndarray, samples: int
) -> list[dict[str, float]]:
    """Per k in 1, 2, 4, ... up to ``samples``: PSNR, SSIM and relative sharpness of the
    imputed views delivered as the mean of the first k samples (k = 1: one sample), over
    every missing pattern. One sampler run of K samples serves every k."""
    imputer = Imputer.from_model(model)
    views = latents.shape[1]
    counts = [k for k in (1, 2, 4, 8, 16, 32) if k <= samples]
    values = {k: {"psnr_db": [], "ssim": [], "sharpness": []} for k in counts}
    for missing in range(1, views):
        for hidden in itertools.combinations(range(views), missing):
            present = torch.ones(latents.shape[:2], dtype=torch.bool)
            present[:, list(hidden)] = False
            result = imputer(latents, present, samples=samples, seed=0)
            for k in counts:
                chosen = result.samples[:, :k].mean(1)
                for view in hidden:
                    decoded, truth = decode(chosen[:, view]), images[:, view]
                    values[k]["psnr_db"].append(float(np.mean(psnr(decoded, truth))))
                    values[k]["ssim"].append(float(np.mean(ssim(decoded, truth))))
                    values[k]["sharpness"].append(
                        laplacian_energy(decoded) / laplacian_energy(truth)
                    )
    return [
        {"mean_of": k, **{name: round(float(np.mean(v)), 4) for name, v in row.items()}}
        for k, row in values.items()
    ]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", required=True, help="held-out dataset folder")
    parser.add_argument("--model", type=Path, default=DEFAULT_MODEL)
    parser.add_argument("--frames", type=int, default=240, help="frame sets, evenly spaced")
    parser.add_argument(
        "--samples",
        type=int,
        default=4,
        help="K; means of the first 1, 2, 4, ... samples are compared",
    )
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=Path("bench/results/posterior_mean.json"))
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    model = load_mvld_model(args.model)
    latents, images = encode_complete_frame_sets(model, args.data, args.frames)
    decode = LatentDecoder.from_model(model)
    start = time.perf_counter()
    rows = score(model, decode, latents, images, args.samples)
    seconds = round(time.perf_counter() - start, 1)
    print(f"{'delivered':<22} {'PSNR dB':>8} {'SSIM':>7} {'sharpness':>10}")
    for row in rows:
        name = "one sample" if row["mean_of"] == 1 else f"mean of {row['mean_of']} samples"
        print(f"{name:<22} {row['psnr_db']:>8.2f} {row['ssim']:>7.4f} {row['sharpness']:>10.3f}")
    report = {
        "benchmark": "bench/bench_posterior_mean.py",
        "model": str(args.model),
        "data": args.data,
        "frame_sets": len(latents),
        "hardware": cpu_name(),
        "threads": args.threads,
        "sampler": "dpmpp_2m_sde, 20 steps (the default)",
        "patterns": "every camera alone and every pair missing",
        "samples": args.samples,
        "seconds": seconds,
        "rows": rows,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"written to {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
