"""``mvld-train``: train the autoencoder, the score model or the downstream classifier."""

from mvld.planned import run_planned_command


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``mvld-train``."""
    return run_planned_command(
        "mvld-train",
        "Train on a dataset folder: `mvld-train ae --data DIR`, then "
        "`mvld-train score --data DIR --ae CKPT`, and `mvld-train classifier --data DIR`.",
        issue=4,
        argv=argv,
    )
