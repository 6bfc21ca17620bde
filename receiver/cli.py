"""``mvld-receiver``: receive latents from edge nodes, impute missing views, run tasks."""

from mvld.planned import run_planned_command


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``mvld-receiver``."""
    return run_planned_command(
        "mvld-receiver",
        "Receive latents from many edge nodes, impute the missing views with the "
        "diffusion model, decode every view and hand complete frame sets to downstream "
        "tasks, e.g. `mvld-receiver --gpu 0 --bind tcp://*:5555`.",
        issue=8,
        argv=argv,
    )
