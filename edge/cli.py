"""``mvld-edge``: run an edge node (capture, health, encode, stream)."""

from mvld.planned import run_planned_command


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``mvld-edge``."""
    return run_planned_command(
        "mvld-edge",
        "Capture several cameras, detect failed or obstructed ones, encode the usable "
        "views and stream their latents to a receiver, e.g. "
        "`mvld-edge --cams 0,1,2 --connect tcp://RECEIVER:5555`.",
        issue=6,
        argv=argv,
    )
