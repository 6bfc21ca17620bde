"""``mvld-eval``: measure imputation quality, speed and the bandwidth trade-off."""

from mvld.planned import run_planned_command


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``mvld-eval``."""
    return run_planned_command(
        "mvld-eval",
        "Evaluate a model on a dataset for every missing-view pattern: coherence, FID, "
        "PSNR/SSIM, baselines and sampler cost, e.g. `mvld-eval --data DIR --model M`.",
        issue=5,
        argv=argv,
    )
