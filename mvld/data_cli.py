"""``mvld-data``: render, record and check multi-camera datasets."""

from mvld.planned import run_planned_command


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``mvld-data``."""
    return run_planned_command(
        "mvld-data",
        "Render a simulated multi-camera dataset, record one from real cameras, or "
        "check a dataset folder.",
        issue=3,
        argv=argv,
    )
