"""Entry points for commands whose capability has not landed yet.

They still answer ``--help`` with what the command will do, and exit with status 2
and a clear message otherwise, so scripts never mistake them for working tools.
"""

import argparse
import sys


def run_planned_command(prog: str, description: str, issue: int, argv: list[str] | None) -> int:
    """Parse ``--help`` for a planned command; anything else reports it as not available."""
    parser = argparse.ArgumentParser(
        prog=prog,
        description=description,
        epilog=f"Not available in this release: it lands with issue #{issue}.",
    )
    parser.add_argument("args", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)
    parser.parse_args(argv)
    sys.stderr.write(f"{prog}: not available in this release (planned in issue #{issue}).\n")
    return 2
