"""Samplers on a trained model: error against the true latents, and drift along the trajectory.

The Gaussian known-answer test (bench_samplers.py) has an exact score; a trained network does
not, and samplers differ in how they carry its errors. On the held-out tail of a dataset this
measures, for every sampler run and every missing-view pattern (pooled by how many views are
missing):

- ``mse``: mean squared error of the imputed standardised latents against the encoded true
  views (for a perfect sampler, twice the conditional variance);
- ``mean_square``: mean square of the imputed standardised latents (about 1 for samples that
  look like the data; far above 1 is a sampler that left the data);
- ``trace``: for each run, the mean square of the missing views' state after every step, for
  the first pattern with the most views missing (a drifting sampler grows along it).

    python bench/bench_sampler_drift.py --data runs/sim3x64x12000           # packaged model
    python bench/bench_sampler_drift.py --data D --model runs/score --runs dpmpp_2m:20,heun:10
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
import time
from pathlib import Path

import torch

from mvld.hardware import cpu_name
from mvld.model.checkpoint import load_mvld_model
from mvld.receiver.imputation import ScoreNetEps
from mvld.receiver.sampler import get_sampler
from mvld.train.frames import FrameArrays, evenly_spaced, load_frame_arrays, split_train_val
from mvld.train.latents import encode_frame_arrays

DEFAULT_RUNS = (
    "euler_maruyama:200,dpmpp_2m:20,dpmpp_2m:20:spacing=uniform,"
    "dpmpp_2m:20:t_eps=0.01,heun:10,dpmpp_2m_sde:20,dpmpp_2m_sde:10,"
    "dpmpp_2m_sde:20:eta=0.5"
)


def parse_run(text: str) -> tuple[str, int, dict]:
    """``name:steps[:key=value...]`` -> (name, steps, options)."""
    name, steps, *pairs = text.strip().split(":")
    options: dict = {}
    for pair in pairs:
        key, value = pair.split("=", 1)
        options[key] = value if key == "spacing" else float(value)
    return name, int(steps), options


def held_out_latents(model, data: str, frames: int, val_fraction: float) -> torch.Tensor:
    """Standardised latents ``[N, V, D]`` of evenly spaced complete held-out frame sets."""
    preprocess = model.preprocess
    arrays = load_frame_arrays(data, preprocess.height, preprocess.width)
    _, val = split_train_val(len(arrays.stems), val_fraction)
    val = val[arrays.present[val].all(1)]
    val = evenly_spaced(val, frames)
    subset = FrameArrays(
        images=arrays.images[val],
        present=arrays.present[val],
        labels=arrays.labels[val],
        cameras=arrays.cameras,
        stems=[arrays.stems[i] for i in val],
    )
    return model.latent_stats.standardise(
        encode_frame_arrays(model.autoencoder, preprocess, subset)
    )


def measure(eps_model, sde, z: torch.Tensor, run: str, seed: int) -> dict:
    """Errors per number of missing views, and the trace of the hardest pattern."""
    name, steps, options = parse_run(run)
    views = z.shape[1]
    patterns = [p for p in itertools.product([True, False], repeat=views) if any(p) and not all(p)]
    by_missing: dict[int, list[tuple[float, float]]] = {}
    trace: list[dict] = []
    hardest = max(patterns, key=lambda p: (views - sum(p), [not v for v in p]))
    start = time.perf_counter()
    for pattern in patterns:
        observed = torch.tensor(pattern).expand(len(z), -1)
        steps_seen: list[dict] = []

        def record(info: dict, observed=observed, steps_seen=steps_seen) -> None:
            state = info["x"][~observed]
            steps_seen.append({"t": float(info["t"]), "mean_square": state.pow(2).mean().item()})

        out = get_sampler(name)(
            eps_model,
            torch.where(observed[..., None], z, 0.0),
            observed,
            sde=sde,
            steps=steps,
            generator=torch.Generator().manual_seed(seed),
            callback=record,
            **options,
        )
        missing = out.x[~observed]
        by_missing.setdefault(views - sum(pattern), []).append(
            (((missing - z[~observed]) ** 2).mean().item(), missing.pow(2).mean().item())
        )
        if pattern == hardest:
            trace = steps_seen
    rows = {
        str(k): {"mse": sum(m for m, _ in v) / len(v), "mean_square": sum(s for _, s in v) / len(v)}
        for k, v in by_missing.items()
    }
    return {
        "run": run,
        "nfe": out.nfe,
        "seconds": time.perf_counter() - start,
        "by_missing": rows,
        "trace_pattern": list(hardest),
        "trace": trace,
    }


def print_tables(result: dict) -> None:
    counts = sorted({k for row in result["runs"] for k in row["by_missing"]}, key=int)
    header = " | ".join(f"{k} missing: mse / mean sq" for k in counts)
    print(f"\n{'run':38s} {'NFE':>5s} | {header}")
    for row in result["runs"]:
        cells = " | ".join(
            f"{row['by_missing'][k]['mse']:9.3f} / {row['by_missing'][k]['mean_square']:5.2f}"
            for k in counts
        )
        print(f"{row['run']:38s} {row['nfe']:5d} | {cells}")
    print("\nmean square of the missing views along the trajectory (hardest pattern)")
    for row in result["runs"]:
        every = max(1, len(row["trace"]) // 10)
        values = " ".join(f"{step['mean_square']:.2f}" for step in row["trace"][::every])
        print(f"{row['run']:38s} {values}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", required=True, help="dataset folder (held-out tail is used)")
    parser.add_argument("--model", default=None, help="MVLD checkpoint (default: packaged)")
    parser.add_argument(
        "--runs", default=DEFAULT_RUNS, help="name:steps[:key=value], comma-separated"
    )
    parser.add_argument("--frames", type=int, default=200, help="held-out frame sets")
    parser.add_argument("--val-fraction", type=float, default=0.1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    parser.add_argument("--out", type=Path, default=Path("bench/results/sampler_drift.json"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model = load_mvld_model(args.model)
    z = held_out_latents(model, args.data, args.frames, args.val_fraction)
    eps_model = ScoreNetEps(model.score_net)
    result = {
        "command": " ".join(sys.argv),
        "cpu": cpu_name(),
        "torch": torch.__version__,
        "threads": args.threads,
        "model": args.model or "packaged default",
        "data": args.data,
        "frame_sets": len(z),
        "runs": [measure(eps_model, model.sde, z, run, args.seed) for run in args.runs.split(",")],
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1))
    print_tables(result)
    print(f"\nwritten: {args.out}")


if __name__ == "__main__":
    main()
