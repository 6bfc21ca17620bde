"""Training throughput (samples/s) of both MVLD stages with the default architectures.

Runs real optimiser steps of the training objectives (the autoencoder's L1 + SSIM loss, the
masked multi-time loss) on synthetic inputs of the right shapes (the step cost does not
depend on the pixel values), after warm-up steps, in float32 and in bf16 mixed precision
(``--precision``), and prints a table plus JSON.

    python bench/bench_training.py --steps 10 --json out/bench_training.json
"""

import argparse
import json
import platform
import time
from pathlib import Path

import torch

from mvld.common.preprocess import PreprocessConfig
from mvld.model.autoencoder import Autoencoder, AutoencoderConfig
from mvld.model.score_net import ScoreNet, ScoreNetConfig
from mvld.model.sde import VPSDE
from mvld.train.autoencoder_training import reconstruction_loss
from mvld.train.config import PRECISIONS, AETrainConfig, ScoreTrainConfig
from mvld.train.distributed import resolve_device
from mvld.train.loop import autocast
from mvld.train.score_training import draw_observed_masks, multi_time_loss


def _time_steps(step, warmup: int, steps: int, device: torch.device) -> float:
    """Seconds per step, averaged over ``steps`` after ``warmup`` steps."""
    for _ in range(warmup):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    began = time.perf_counter()
    for _ in range(steps):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return (time.perf_counter() - began) / steps


def bench_autoencoder(
    device: torch.device,
    batch: int,
    image_size: int,
    warmup: int,
    steps: int,
    precision: str,
    ssim_weight: float,
) -> dict:
    """One reconstruction step (L1 + ssim_weight (1 - SSIM)) of the default autoencoder."""
    defaults = AETrainConfig()
    config = AutoencoderConfig(
        image_size=image_size,
        latent_dim=defaults.latent_dim,
        channels=defaults.channels,
        res_blocks=defaults.res_blocks,
    )
    model = Autoencoder(config).to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    images = torch.rand(batch, 3, image_size, image_size, device=device) * 2 - 1
    preprocess = PreprocessConfig(height=image_size, width=image_size)

    def step() -> None:
        with autocast(device, precision):
            reconstruction = model(images)
        loss = reconstruction_loss(reconstruction.float(), images, preprocess, ssim_weight)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    seconds = _time_steps(step, warmup, steps, device)
    return {
        "stage": "autoencoder",
        "params": sum(p.numel() for p in model.parameters()),
        "batch": batch,
        "precision": precision,
        "ssim_weight": ssim_weight,
        "ms_per_step": seconds * 1e3,
        "samples_per_s": batch / seconds,
        "shape": f"{image_size}x{image_size}",
    }


def bench_score(
    device: torch.device,
    batch: int,
    views: int,
    latent_dim: int,
    warmup: int,
    steps: int,
    precision: str,
) -> dict:
    """One multi-time masked step of the default score network."""
    defaults = ScoreTrainConfig()
    net = ScoreNet(
        ScoreNetConfig(
            num_views=views,
            latent_dim=latent_dim,
            widths=defaults.widths,
            time_dim=defaults.time_dim,
        )
    ).to(device)
    optimizer = torch.optim.Adam(net.parameters(), lr=defaults.lr)
    sde, generator = VPSDE(), torch.Generator().manual_seed(0)
    z0 = torch.randn(batch, views, latent_dim, device=device)

    def step() -> None:
        observed = draw_observed_masks(batch, views, defaults.cond_prob, generator).to(device)
        t = torch.rand(batch, generator=generator).to(device)
        noise = torch.randn(z0.shape, generator=generator).to(device)
        with autocast(device, precision):
            loss = multi_time_loss(net, sde, z0, observed, t, noise).mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    seconds = _time_steps(step, warmup, steps, device)
    return {
        "stage": "score",
        "params": sum(p.numel() for p in net.parameters()),
        "batch": batch,
        "precision": precision,
        "ms_per_step": seconds * 1e3,
        "samples_per_s": batch / seconds,
        "shape": f"{views}x{latent_dim}",
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: default)")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--views", type=int, default=3)
    parser.add_argument("--ae-batch", type=int, default=AETrainConfig().batch_size)
    parser.add_argument("--score-batch", type=int, default=ScoreTrainConfig().batch_size)
    parser.add_argument(
        "--precision",
        default=",".join(PRECISIONS),
        help="comma-separated: fp32, bf16 (default: both)",
    )
    parser.add_argument(
        "--ssim-weight",
        type=float,
        default=AETrainConfig().ssim_weight,
        help="the autoencoder loss's SSIM weight (0: L1 alone)",
    )
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    torch.manual_seed(0)
    results = []
    for precision in args.precision.split(","):
        results += [
            bench_autoencoder(
                device,
                args.ae_batch,
                args.image_size,
                args.warmup,
                args.steps,
                precision,
                args.ssim_weight,
            ),
            bench_score(
                device,
                args.score_batch,
                args.views,
                AETrainConfig().latent_dim,
                args.warmup,
                args.steps,
                precision,
            ),
        ]
    print(
        f"{'stage':12s} {'params':>10s} {'input':>8s} {'batch':>6s} {'precision':>9s} "
        f"{'ms/step':>9s} {'samples/s':>10s}"
    )
    for r in results:
        print(
            f"{r['stage']:12s} {r['params']:10d} {r['shape']:>8s} {r['batch']:6d} "
            f"{r['precision']:>9s} {r['ms_per_step']:9.1f} {r['samples_per_s']:10.1f}"
        )
    report = {
        "device": str(device),
        "threads": torch.get_num_threads(),
        "cpu": platform.processor() or platform.machine(),
        "torch": torch.__version__,
        "results": results,
    }
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
