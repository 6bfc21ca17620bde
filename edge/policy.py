"""Transmit policy: which healthy views to send when bandwidth is limited.

The paper's semantic-communication mode: send the latents of only k of the V views and
let the receiver impute the others. A view not sent by choice is marked *withheld* (not
failed) in the wire message. The rule decides which views to keep:

- ``round_robin`` (default): the withheld views rotate frame set by frame set, so every
  camera reaches the receiver regularly and no view is imputed for long stretches;
- ``priority``: always keep the cameras listed first in ``priority`` (e.g. the widest view);
- ``random``: a seeded random choice per frame set.
"""

import random
from collections.abc import Sequence
from dataclasses import dataclass, field

from mvld.common.config_flags import option
from mvld.common.errors import ConfigError

RULES = ("round_robin", "priority", "random")


@dataclass(frozen=True)
class TransmitPolicyConfig:
    """How many views to send at most; ``None`` everywhere means send every usable view."""

    max_views: int | None = field(
        default=None,
        metadata=option(
            "send at most K usable views per frame set",
            default_text="every usable view",
            metavar="K",
        ),
    )
    budget_bytes: int | None = field(
        default=None,
        metadata=option(
            "latent bytes per frame set at most (at least one view is sent)",
            default_text="no budget",
            metavar="BYTES",
        ),
    )
    rule: str = field(
        default="round_robin",
        metadata=option(
            "which usable views to withhold under a limit", flag="--withhold-rule", choices=RULES
        ),
    )
    priority: tuple[int, ...] = field(
        default=(),
        metadata=option(
            "camera numbers kept first by --withhold-rule priority, e.g. 0,2", metavar="N,..."
        ),
    )
    seed: int = field(
        default=0,
        metadata=option(
            "random seed of --withhold-rule random", flag="--withhold-seed", metavar="N"
        ),
    )

    def __post_init__(self) -> None:
        if self.rule not in RULES:
            valid = ", ".join(RULES)
            raise ConfigError(f"unknown transmit rule {self.rule!r}; valid rules: {valid}")
        if self.max_views is not None and self.max_views < 1:
            raise ConfigError(f"--max-views must be at least 1, got {self.max_views}")
        if self.budget_bytes is not None and self.budget_bytes < 1:
            raise ConfigError(f"--budget-bytes must be positive, got {self.budget_bytes}")


@dataclass
class TransmitPolicy:
    """Chooses, per frame set, which usable views are sent and which are withheld."""

    config: TransmitPolicyConfig = field(default_factory=TransmitPolicyConfig)
    _turn: int = 0
    _rng: random.Random = field(init=False)

    def __post_init__(self) -> None:
        self._rng = random.Random(self.config.seed)

    def view_limit(self, bytes_per_view: int) -> int | None:
        """The number of views allowed by ``max_views`` and the byte budget together."""
        limits = []
        if self.config.max_views is not None:
            limits.append(self.config.max_views)
        if self.config.budget_bytes is not None:
            limits.append(max(1, self.config.budget_bytes // max(1, bytes_per_view)))
        return min(limits) if limits else None

    def select(self, usable: Sequence[int], bytes_per_view: int) -> tuple[list[int], list[int]]:
        """Split usable camera ids into ``(sent, withheld)``, both in camera order.

        At least one view is always sent when one is usable: the receiver needs one
        observed view to condition on.
        """
        usable = sorted(usable)
        limit = self.view_limit(bytes_per_view)
        if limit is None or len(usable) <= limit:
            return usable, []
        kept = set(self._choose(usable, limit))
        sent = [cam for cam in usable if cam in kept]
        withheld = [cam for cam in usable if cam not in kept]
        return sent, withheld

    def _choose(self, usable: list[int], limit: int) -> list[int]:
        if self.config.rule == "round_robin":
            start = self._turn % len(usable)
            self._turn += 1
            return [usable[(start + i) % len(usable)] for i in range(limit)]
        if self.config.rule == "priority":
            rank = {cam: i for i, cam in enumerate(self.config.priority)}
            return sorted(usable, key=lambda cam: (rank.get(cam, len(rank)), cam))[:limit]
        return self._rng.sample(usable, limit)
