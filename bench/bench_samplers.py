"""Imputation samplers: accuracy against an exact answer, and speed on the project's model size.

Two measurements, written as JSON to ``--out`` and printed as tables:

- ``accuracy``: each sampler and step count driven by the exact eps of Gaussian data
  (tests/test_sampler_gaussian.py, V=3, D=2, correlated), whitened errors of the mean and the
  covariance of the missing dims against the exact conditional (0 = exact; sampling noise alone
  is about 0.03 / 0.08 at 4000 samples), per missing-view pattern;
- ``speed``: ms per frame set and NFE of each sampler at batch 1 and 64 on this CPU, with the
  exact Gaussian eps and with a randomly initialised ScoreNet of the project's default size
  (V=3, the default latent size and widths; output layer drawn N(0, 0.02) instead of zeros so
  the adaptive sampler has work to do), 1 of 3 views missing.

    python bench/bench_samplers.py                        # about 2 minutes on 1 core
    python bench/bench_samplers.py --samples 2000 --threads 2 --out /tmp/samplers.json
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import torch

from mvld.model.autoencoder import AutoencoderConfig
from mvld.model.score_net import ScoreNet, ScoreNetConfig
from mvld.model.sde import VPSDE

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))  # the test oracle
from gaussian_reference import (
    CLEAN,
    PATTERNS,
    GaussianEps,
    GaussianMoments,
    gaussian_problem,
    moment_errors,
)

from mvld.receiver.imputation import ScoreNetEps
from mvld.receiver.sampler import get_sampler
from mvld.train.config import ScoreTrainConfig

SDE = VPSDE()
LATENT_DIM = AutoencoderConfig().latent_dim
ACCURACY_RUNS = [  # (sampler, steps, options)
    ("euler_maruyama", 1000, {}),
    ("euler_maruyama", 250, {}),
    ("euler_maruyama", 100, {}),
    ("heun", 5, {}),
    ("heun", 10, {}),
    ("heun", 20, {}),
    ("heun", 10, {"spacing": "uniform"}),
    ("dpmpp_2m", 10, {}),
    ("dpmpp_2m", 20, {}),
    ("dpmpp_2m", 20, {"spacing": "karras"}),
    ("dpmpp_2m_sde", 10, {}),
    ("dpmpp_2m_sde", 20, {}),
    ("dpmpp_2m_sde", 20, {"eta": 0.5}),
    ("adaptive", 500, {"eps_rel": 0.05}),
    ("adaptive", 500, {"eps_rel": 0.02}),
    ("adaptive", 500, {"eps_rel": 0.01, "eps_abs": 0.002}),
]
SPEED_RUNS = [
    ("euler_maruyama", 1000, {}),
    ("heun", 10, {}),
    ("dpmpp_2m", 20, {}),
    ("dpmpp_2m_sde", 20, {}),
    ("adaptive", 500, {}),
]


def label(name: str, steps: int, options: dict) -> str:
    extra = "".join(f" {k}={v}" for k, v in options.items())
    return f"{name} steps={steps}{extra}" if name != "adaptive" else f"{name}{extra}"


def accuracy(samples: int) -> list[dict]:
    """Whitened moment errors of every run on every missing-view pattern."""
    model = GaussianEps(*gaussian_problem(), SDE)
    rows = []
    for name, steps, options in ACCURACY_RUNS:
        for pattern_name, pattern in PATTERNS.items():
            mask = torch.tensor(pattern)
            observed, x_obs = mask.expand(samples, -1), CLEAN.expand(samples, -1, -1)
            start = time.perf_counter()
            out = get_sampler(name)(
                model,
                x_obs,
                observed,
                sde=SDE,
                steps=steps,
                generator=torch.Generator().manual_seed(0),
                **options,
            )
            seconds = time.perf_counter() - start
            target = model.conditional(mask, CLEAN.reshape(1, -1)[:, model.dims_of(mask)])
            missing = out.x.reshape(samples, -1)[:, model.dims_of(~mask)]
            mean_error, cov_error = moment_errors(
                missing, GaussianMoments(target.mean[0], target.cov)
            )
            rows.append(
                {
                    "run": label(name, steps, options),
                    "sampler": name,
                    "steps": steps,
                    "options": options,
                    "pattern": pattern_name,
                    "nfe": out.nfe,
                    "mean_error": mean_error,
                    "cov_error": cov_error,
                    "seconds": seconds,
                }
            )
    return rows


def project_score_net() -> ScoreNet:
    """A randomly initialised ScoreNet of the project's default size."""
    torch.manual_seed(0)
    net = ScoreNet(
        ScoreNetConfig(
            num_views=3, latent_dim=AutoencoderConfig().latent_dim, widths=ScoreTrainConfig().widths
        )
    )
    torch.nn.init.normal_(net.output.weight, std=0.02)
    return net.eval()


def time_sampler(
    eps_model, dim: int, batch: int, name: str, steps: int, options: dict, repeats: int
) -> dict:
    """Best-of-``repeats`` ms per frame set (1 of 3 views missing) and the NFE."""
    observed = torch.tensor([True, True, False]).expand(batch, -1)
    x_obs = torch.randn(batch, 3, dim, generator=torch.Generator().manual_seed(1))
    best, nfe = float("inf"), 0
    for _ in range(repeats):
        start = time.perf_counter()
        out = get_sampler(name)(
            eps_model,
            x_obs,
            observed,
            sde=SDE,
            steps=steps,
            generator=torch.Generator().manual_seed(0),
            **options,
        )
        best, nfe = min(best, time.perf_counter() - start), out.nfe
    return {
        "ms_per_frame_set": 1000 * best / batch,
        "nfe": nfe,
        "ms_per_eval_per_frame_set": 1000 * best / batch / nfe,
    }


def speed(repeats: int) -> list[dict]:
    """Timings with the exact Gaussian eps and with the project-size ScoreNet."""
    models = {
        "gaussian_exact": (GaussianEps(*gaussian_problem(), SDE), 2),
        f"score_net_3x{LATENT_DIM}": (ScoreNetEps(project_score_net()), LATENT_DIM),
    }
    rows = []
    for model_name, (eps_model, dim) in models.items():
        for name, steps, options in SPEED_RUNS:
            for batch in (1, 64):
                timing = time_sampler(
                    eps_model,
                    dim,
                    batch,
                    name,
                    steps,
                    options,
                    1 if name == "euler_maruyama" else repeats,
                )
                rows.append(
                    {
                        "model": model_name,
                        "run": label(name, steps, options),
                        "batch": batch,
                        **timing,
                    }
                )
    return rows


def print_tables(result: dict) -> None:
    print("\naccuracy (exact Gaussian eps; whitened errors mean / cov; 0 = exact)")
    print(f"{'run':40s} {'pattern':8s} {'NFE':>5s} {'mean err':>9s} {'cov err':>9s}")
    for row in result["accuracy"]:
        print(
            f"{row['run']:40s} {row['pattern']:8s} {row['nfe']:5d} "
            f"{row['mean_error']:9.3f} {row['cov_error']:9.3f}"
        )
    print(f"\nspeed ({result['threads']} CPU thread(s), 1 of 3 views missing)")
    print(f"{'model':16s} {'run':28s} {'batch':>5s} {'NFE':>5s} {'ms/frame set':>13s}")
    for row in result["speed"]:
        print(
            f"{row['model']:16s} {row['run']:28s} {row['batch']:5d} {row['nfe']:5d} "
            f"{row['ms_per_frame_set']:13.3f}"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=4000, help="samples per accuracy run")
    parser.add_argument("--repeats", type=int, default=3, help="timing repeats (best kept)")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    parser.add_argument("--out", type=Path, default=Path("bench/results/samplers.json"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    result = {
        "command": " ".join(sys.argv),
        "machine": platform.processor() or platform.machine(),
        "torch": torch.__version__,
        "threads": args.threads,
        "samples": args.samples,
        "accuracy": accuracy(args.samples),
        "speed": speed(args.repeats),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1))
    print_tables(result)
    print(f"\nwritten: {args.out}")


if __name__ == "__main__":
    main()
