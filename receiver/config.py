"""``ReceiverConfig``: everything ``mvld-receiver`` is configured with, validated once.

Its own module so the service, the compute stage and the cluster workers share one definition
without importing each other; the command-line flags are generated from its fields.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from mvld.common.config_flags import (
    metrics_host_field,
    metrics_port_field,
    option,
    status_every_field,
)
from mvld.common.errors import ConfigError
from mvld.receiver.imputation import DEFAULT_SAMPLER, DEFAULT_STEPS, IMPUTERS
from mvld.receiver.ingest import CLOCK_WINDOW_S
from mvld.receiver.precision import PRECISIONS
from mvld.receiver.sampler import sampler_info, sampler_names

__all__ = ["LOOPBACK_BIND", "PUBLIC_BIND", "ReceiverConfig"]


LOOPBACK_BIND = "tcp://127.0.0.1:5555"  # the default without CurveZMQ
PUBLIC_BIND = "tcp://*:5555"  # the default with --keys/--allow
DEFAULT_LATENCY_BUDGET_MS = 150.0


def backlog_depth(max_batch: int, max_rate: float, latency_budget_ms: float) -> int:
    """Default frame sets kept per node: what one node may send within the latency budget
    (at least 4, at most a batch); a whole batch when the rate or the budget is unbounded."""
    if max_rate <= 0 or latency_budget_ms <= 0:
        return max_batch
    return max(1, min(max_batch, max(4, math.ceil(max_rate * latency_budget_ms / 1000.0))))


@dataclass(frozen=True)
class ReceiverConfig:
    """Everything ``mvld-receiver`` is configured with, validated once."""

    bind: tuple[str, ...] = field(
        default=(),
        metadata=option(
            "ZeroMQ endpoint to bind; repeatable or comma-separated. Without --keys the default "
            "lets only this machine connect; another address must be bound explicitly, and is "
            "warned about while CurveZMQ is off",
            metavar="ENDPOINT",
            default_text=f"{LOOPBACK_BIND}; {PUBLIC_BIND} with --keys",
        ),
    )
    model: str | None = field(
        default=None,
        metadata=option(
            "model checkpoint (P, P.json or a run folder)",
            default_text="the packaged model",
            metavar="PATH",
        ),
    )
    gpu: int = field(
        default=0,
        metadata=option(
            "CUDA device index; -1 = CPU (no CUDA: the CPU, with a warning)", metavar="N"
        ),
    )
    keys: str | None = field(
        default=None,
        metadata=option(
            "CurveZMQ secret key of this receiver (with --allow)",
            default_text="off, no CurveZMQ",
            metavar="RECEIVER.key_secret",
        ),
    )
    allow: str | None = field(
        default=None,
        metadata=option(
            "folder of allowed edge public keys (*.key) (with --keys)",
            default_text="off, no CurveZMQ",
            metavar="DIR",
        ),
    )
    tasks: tuple[str, ...] = field(
        default=(),
        metadata=option(
            "downstream task, repeatable: save, classify, jsonl, publish, an installed mvld.tasks "
            "entry point or a dotted path module:Name",
            flag="--task",
            split=False,
            metavar="NAME[:key=value,...]",
        ),
    )
    sampler: str = field(
        default=DEFAULT_SAMPLER,
        metadata=option("imputation sampler (docs/SAMPLERS.md)", choices=sampler_names),
    )
    steps: int = field(default=DEFAULT_STEPS, metadata=option("sampler steps", metavar="N"))
    imputer: str = field(
        default="diffusion",
        metadata=option(
            "how missing views are filled: diffusion (the score network with --sampler) or ridge "
            "(deterministic regression on the observed views, fitted by mvld-train all and saved "
            "beside the checkpoint; see the model verdict logged at start-up)",
            choices=IMPUTERS,
        ),
    )
    samples: int = field(
        default=1,
        metadata=option(
            "samples per frame set; more than 1 gives per-view uncertainty", metavar="K"
        ),
    )
    posterior_mean: bool = field(
        default=False,
        metadata=option(
            "deliver the mean of the --samples K samples for imputed views instead of the first "
            "sample: higher PSNR/SSIM, blurrier images (docs/RECEIVER.md, Posterior means)"
        ),
    )
    deliver_unconditioned: bool = field(
        default=False,
        metadata=option(
            "hand frame sets with no observed view (every view generated from nothing) to the "
            "tasks; off: they are withheld and counted, except for tasks that ask for them"
        ),
    )
    camera_memory: bool = field(
        default=True,
        metadata=option(
            "video-aware models: condition a missing view on its camera's last observed latent "
            "and its age (docs/RECEIVER.md, Camera memory); models without memory ignore it"
        ),
    )
    memory_guard_frames: int = field(
        default=10,
        metadata=option(
            "camera memory: observed frames of a camera passed over when it fails for a "
            "picture fault (cover, dirt, black, noise, ...), since the edge sent them while it "
            "confirmed the fault; set it to the edge's confirm_obstructed_frames",
            metavar="N",
        ),
    )
    max_batch: int = field(
        default=64, metadata=option("frame sets per imputation call at most", metavar="N")
    )
    latency_budget_ms: float = field(
        default=DEFAULT_LATENCY_BUDGET_MS,
        metadata=option(
            "adaptive batching: wait for more frame sets only while the oldest waiting one plus "
            "the predicted batch time stays within this budget, and only as long as a batch does "
            "not already keep up; 0 = fixed window of --max-wait-ms (docs/RECEIVER.md, Batching)",
            metavar="MS",
        ),
    )
    max_wait_ms: float = field(
        default=10.0,
        metadata=option(
            "longest wait to fill a batch with --latency-budget-ms 0, and for the first batch "
            "before its cost is measured",
            metavar="MS",
        ),
    )
    backlog_per_node: int | None = field(
        default=None,
        metadata=option(
            "frame sets kept per node, newest first; deep enough for one node to fill a batch "
            "within the latency budget",
            flag="--backlog",
            metavar="N",
            default_text="--max-rate x budget, 4 to --max-batch",
        ),
    )
    precision: str = field(
        default="auto",
        metadata=option(
            "score network and decoder arithmetic: auto = bf16 on CPUs with AVX512-BF16 or AMX and "
            "on CUDA GPUs that have it (else fp16 there), fp32 elsewhere (docs/RECEIVER.md, Speed)",
            choices=PRECISIONS,
        ),
    )
    max_age_ms: float = field(
        default=1000.0, metadata=option("older frame sets are dropped and counted", metavar="MS")
    )
    max_nodes: int = field(default=256, metadata=option("edge nodes tracked at once", metavar="N"))
    cameras: tuple[str, ...] = field(
        default=(),
        metadata=option(
            "comma-separated camera id of each model view",
            default_text="cam0,cam1,...",
            metavar="ID,...",
        ),
    )
    metrics_port: int | None = metrics_port_field()
    metrics_host: str = metrics_host_field()
    status_every_s: float = status_every_field()
    threads: int | None = field(
        default=None,
        metadata=option(
            "torch CPU threads (on a busy CPU 1 is often several times faster than 2)",
            default_text="the cores this process may use minus the load average, at least 1",
            metavar="N",
        ),
    )
    max_rate: float = field(
        default=120.0,
        metadata=option(
            "frame sets per second accepted from one node (its CurveZMQ key, else its node id); "
            "faster ones are dropped and counted; 0 = no limit",
            metavar="PER_S",
        ),
    )
    clock_window_s: float = field(
        default=CLOCK_WINDOW_S,
        metadata=option(
            "frame sets whose send or capture times are more than S seconds off this machine's "
            "clock are counted and kept out of the latency figures",
            flag="--clock-window",
            metavar="S",
        ),
    )
    workers: int = field(
        default=0,
        metadata=option(
            "Ray workers running the impute/decode/tasks stage, one GPU each where the cluster has "
            "GPUs (else one CPU each); 0 = in this process, no Ray (docs/CLUSTER.md)",
            metavar="N",
        ),
    )
    ray_address: str | None = field(
        default=None,
        metadata=option(
            "join this Ray cluster, e.g. ray://head:10001 or auto; without --workers: one worker "
            "per GPU of the cluster",
            flag="--ray",
            default_text="off; a local Ray with --workers",
            metavar="ADDRESS",
        ),
    )

    @property
    def backlog(self) -> int:
        """Frame sets kept per node: ``--backlog``, or the depth derived from the budget."""
        if self.backlog_per_node is None:
            return backlog_depth(self.max_batch, self.max_rate, self.latency_budget_ms)
        return self.backlog_per_node

    def __post_init__(self) -> None:
        if (self.keys is None) != (self.allow is None):
            raise ConfigError("--keys and --allow go together (CurveZMQ needs both)")
        if not self.bind:  # safe by default: unauthenticated means this machine only
            default = PUBLIC_BIND if self.keys is not None else LOOPBACK_BIND
            object.__setattr__(self, "bind", (default,))
        # resolved once, so --print-config shows the depth in use
        object.__setattr__(self, "backlog_per_node", self.backlog)
        if self.latency_budget_ms < 0:
            raise ConfigError(
                f"--latency-budget-ms must be >= 0 (0 = fixed window), got {self.latency_budget_ms}"
            )
        positive = {
            "--steps": self.steps,
            "--samples": self.samples,
            "--max-batch": self.max_batch,
            "--backlog": self.backlog,
            "--max-age-ms": self.max_age_ms,
            "--max-nodes": self.max_nodes,
            "--status-every": self.status_every_s,
        }
        if self.threads is not None:
            positive["--threads"] = self.threads
        if self.max_rate < 0:
            raise ConfigError(f"--max-rate must be >= 0 (0 = no limit), got {self.max_rate}")
        for flag, value in positive.items():
            if not value > 0:
                raise ConfigError(f"{flag} must be > 0, got {value}")
        if self.memory_guard_frames < 0:
            raise ConfigError(f"--memory-guard-frames must be >= 0, got {self.memory_guard_frames}")
        if self.max_wait_ms < 0:
            raise ConfigError(f"--max-wait-ms must be >= 0, got {self.max_wait_ms}")
        if not self.clock_window_s > 0:
            raise ConfigError(f"--clock-window must be > 0, got {self.clock_window_s}")
        if self.workers < 0:
            raise ConfigError(f"--workers must be >= 0 (0 = no Ray), got {self.workers}")
        if self.ray_address is not None and not self.ray_address.strip():
            raise ConfigError("--ray needs an address, e.g. auto or ray://head:10001")
        sampler_info(self.sampler).check_steps(self.steps)
        if self.imputer == "ridge" and self.samples != 1:
            raise ConfigError("--imputer ridge is deterministic: --samples must be 1")
        if self.posterior_mean and self.samples < 2:
            raise ConfigError("--posterior-mean averages samples: give --samples K with K >= 2")
