"""``python -m mvld`` runs the umbrella command."""

from mvld.cli import main

raise SystemExit(main())
