"""Sampler step floors on a real model: imputed-view PSNR against the number of steps.

For each sampler and step count, the missing view of held-out frame sets (one view missing,
each camera in turn) is imputed and decoded, and its PSNR against the true view is taken;
Euler-Maruyama at many steps is the reference. A sampler's floor is the fewest steps whose
PSNR is within ``--tolerance`` dB of its own PSNR at the most steps measured: below that it
collapses (towards the mean latent). The floors in ``mvld.receiver.sampler`` come from this.

Usage: ``python bench/bench_sampler_floor.py --data runs/held128 [--model DIR]
[--frames 32] [--out bench/results/sampler_floor.json]``.
"""

from __future__ import annotations

import argparse
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
from mvld.train.image_quality import psnr
from mvld.train.latents import encode_complete_frame_sets

SWEEP = {
    "dpmpp_2m_sde": (3, 4, 5, 6, 8, 10, 20),
    "dpmpp_2m": (3, 4, 5, 6, 8, 10, 20),
    "heun": (2, 3, 4, 5, 6, 10),
    "euler_maruyama": (10, 50, 200),
}


def imputed_psnr(
    model,
    decode: LatentDecoder,
    latents: torch.Tensor,
    images: np.ndarray,
    sampler: str,
    steps: int,
) -> float:
    """Mean PSNR (dB) of the decoded imputed view, one view missing, every camera in turn."""
    imputer = Imputer.from_model(model, sampler=sampler, steps=steps)
    scores = []
    for view in range(latents.shape[1]):
        present = torch.ones(latents.shape[:2], dtype=torch.bool)
        present[:, view] = False
        result = imputer(latents, present, seed=0)
        decoded = decode(result.latents[:, view])
        scores.append(float(np.mean(psnr(decoded, images[:, view]))))
    return float(np.mean(scores))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", required=True, help="held-out dataset folder")
    parser.add_argument("--model", type=Path, default=DEFAULT_MODEL)
    parser.add_argument("--frames", type=int, default=32, help="frame sets, evenly spaced")
    parser.add_argument(
        "--reference-steps", type=int, default=1000, help="Euler-Maruyama steps of the reference"
    )
    parser.add_argument(
        "--tolerance",
        type=float,
        default=0.5,
        help="dB below the sampler's best that still counts as not collapsed",
    )
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=Path("bench/results/sampler_floor.json"))
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    model = load_mvld_model(args.model)
    latents, images = encode_complete_frame_sets(model, args.data, args.frames)
    decode = LatentDecoder.from_model(model)
    sweep = {**SWEEP, "euler_maruyama": (*SWEEP["euler_maruyama"], args.reference_steps)}
    rows, start = [], time.perf_counter()
    for sampler, counts in sweep.items():
        for steps in counts:
            value = imputed_psnr(model, decode, latents, images, sampler, steps)
            rows.append({"sampler": sampler, "steps": steps, "psnr_db": round(value, 3)})
            print(f"{sampler:<15} {steps:>5} steps  {value:6.2f} dB", flush=True)
    reference = next(
        r["psnr_db"]
        for r in rows
        if r["sampler"] == "euler_maruyama" and r["steps"] == args.reference_steps
    )
    floors = {}
    for sampler in SWEEP:
        mine = [r for r in rows if r["sampler"] == sampler]
        best = mine[-1]["psnr_db"]
        floors[sampler] = min(r["steps"] for r in mine if r["psnr_db"] >= best - args.tolerance)
    report = {
        "benchmark": "bench/bench_sampler_floor.py",
        "model": str(args.model),
        "data": args.data,
        "frame_sets": len(latents),
        "hardware": cpu_name(),
        "threads": args.threads,
        "tolerance_db": args.tolerance,
        "reference": {
            "sampler": "euler_maruyama",
            "steps": args.reference_steps,
            "psnr_db": reference,
        },
        "floors": floors,
        "rows": rows,
        "seconds": round(time.perf_counter() - start, 1),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"\n{'sampler':<15} {'floor (steps)':>13}")
    for sampler, floor in floors.items():
        print(f"{sampler:<15} {floor:>13}")
    print(
        f"reference euler_maruyama:{args.reference_steps} {reference:.2f} dB; written to {args.out}"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
