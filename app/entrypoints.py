"""Console scripts of the stage commands whose ``main`` does not apply the exit policy itself.

``mvld-edge``, ``mvld-receiver`` and ``mvld-export`` run their CLI module's ``main`` behind
:func:`mvld.common.exits.command`: the CLI is imported inside the guard, so a missing extra
(torch on an edge-only install) is named in one line instead of a ``ModuleNotFoundError``
traceback, and a signal that arrives while the command is still importing ends it with
130/143 and no traceback. The services ``mvld-edge`` and ``mvld-receiver`` take SIGINT/SIGTERM
as their normal stop (0) from their first line on: a stop event is set up before their
imports and handed to their ``main``. Once a stage's ``main`` carries the decorator itself its
script can point at it directly.
"""

from __future__ import annotations

from mvld.common.exits import command, stop_event_on_signals


@command("mvld-edge", extras="edge")
def edge(argv: list[str] | None = None) -> int:
    """``mvld-edge`` (a clean stop on SIGINT/SIGTERM exits 0: it is a service)."""
    stop = stop_event_on_signals()  # before the imports: a stop then is a normal stop too
    from mvld.edge.cli import main

    return main(argv, stop)


@command("mvld-receiver", extras="receiver")
def receiver(argv: list[str] | None = None) -> int:
    """``mvld-receiver`` (a clean stop on SIGINT/SIGTERM exits 0: it is a service)."""
    stop = stop_event_on_signals()  # before the imports: a stop then is a normal stop too
    from mvld.receiver.cli import main

    return main(argv, stop)


@command("mvld-export", extras="export,train")
def export(argv: list[str] | None = None) -> int:
    """``mvld-export``."""
    from mvld.export.cli import main

    return main(argv)
