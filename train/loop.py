"""The step loop both stages share: progress bar, throughput, validation and checkpoint cadence.

A stage supplies three closures: ``train_step(step) -> loss`` (one optimiser step),
``validate(step) -> metrics`` and ``save(step, metrics)``. Everything a stage draws at step
``s`` is seeded by ``(seed, s)``, so a resumed run repeats an uninterrupted one exactly.

SIGINT/SIGTERM never cut a step in half (the weights and the optimiser would disagree with the
saved step): the loop finishes the step it is in, saves it, and then raises KeyboardInterrupt
or :class:`~mvld.common.exits.Terminated`; ``--resume`` continues from that checkpoint as if
the run had never stopped. A second signal stops at once, without saving.
"""

import json
import logging
import math
import signal
import time
from collections.abc import Callable
from pathlib import Path

import torch
from tqdm import tqdm

from mvld.common.exits import StopRequest, deferred_stop_signals, stop_exception
from mvld.train.distributed import DistributedContext

log = logging.getLogger(__name__)
LOG_EVERY = 50  # steps between log lines when the progress bar is off


def step_generator(seed: int, step: int, salt: int = 0) -> torch.Generator:
    """A CPU generator owned by one step (independent of how the run was split or resumed)."""
    return torch.Generator().manual_seed((seed * 1_000_003 + step) * 8 + salt)


class EpochSampler:
    """Batches of indices into ``count`` items: a fresh seeded permutation every epoch."""

    def __init__(self, count: int, batch_size: int, seed: int) -> None:
        self.count, self.batch_size, self.seed = count, batch_size, seed
        self.steps_per_epoch = count // batch_size
        self._epoch, self._order = -1, torch.empty(0, dtype=torch.long)

    def batch(self, step: int) -> torch.Tensor:
        """The global batch of indices used at ``step`` (drop-last epochs)."""
        epoch, position = divmod(step, self.steps_per_epoch)
        if epoch != self._epoch:
            generator = torch.Generator().manual_seed(self.seed * 7919 + epoch)
            self._epoch, self._order = epoch, torch.randperm(self.count, generator=generator)
        start = position * self.batch_size
        return self._order[start : start + self.batch_size]


def autocast(device: torch.device, precision: str) -> torch.autocast:
    """Mixed precision for a training forward pass: bf16 matmuls and convolutions, fp32 weights.

    On CPUs with AMX or AVX512-BF16 this runs the autoencoder's step about 2x faster; weights,
    optimiser state, validation and the saved model stay float32.
    """
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16")


def set_learning_rate(
    optimizer: torch.optim.Optimizer, base: float, schedule: str, step: int, steps: int
) -> None:
    """Set the rate of ``step`` (1-based): constant, or cosine from ``base`` to ``base / 10``."""
    rate = base
    if schedule == "cosine":
        rate = base * (0.1 + 0.45 * (1 + math.cos(math.pi * (step - 1) / max(steps - 1, 1))))
    for group in optimizer.param_groups:
        group["lr"] = rate


def _due(step: int, every: int, last: int) -> bool:
    return step == last or (every > 0 and step % every == 0)


def _stop_signal(ctx: DistributedContext, request: StopRequest) -> int | None:
    """The stop signal if any rank got one (ranks must leave at the same step), else None."""
    if ctx.world_size == 1:
        return request.signum
    anywhere = ctx.mean(1.0 if request else 0.0) > 0
    return (request.signum or signal.SIGTERM) if anywhere else None


def run_loop(
    *,
    ctx: DistributedContext,
    start_step: int,
    steps: int,
    samples_per_step: int,
    val_every: int,
    checkpoint_every: int,
    out: Path,
    progress: bool,
    desc: str,
    train_step: Callable[[int], float],
    validate: Callable[[int], dict[str, float]],
    save: Callable[[int, dict[str, float]], None],
) -> dict[str, float]:
    """Run steps ``start_step+1 .. steps``; returns the last validation metrics.

    On SIGINT/SIGTERM: saves the last finished step (unless just saved) and raises the
    signal's exception (KeyboardInterrupt / Terminated) once the handlers are restored.
    """
    metrics: dict[str, float] = {}
    bar = tqdm(
        total=steps,
        initial=start_step,
        desc=desc,
        disable=not (progress and ctx.is_main),
        dynamic_ncols=True,
    )
    log_file = out / "metrics.jsonl"
    began = time.perf_counter()
    stopped_by: int | None = None
    with deferred_stop_signals() as request:
        try:
            for done, step in enumerate(range(start_step + 1, steps + 1), start=1):
                loss = train_step(step)
                rate = done * samples_per_step / (time.perf_counter() - began)
                bar.update(1)
                bar.set_postfix(loss=f"{loss:.4f}", samples_s=f"{rate:.0f}")
                if ctx.is_main and not progress and step % LOG_EVERY == 0:
                    log.info(
                        "%s step %d/%d loss %.4f, %.1f samples/s", desc, step, steps, loss, rate
                    )
                if _due(step, val_every, steps):
                    metrics = validate(step) if ctx.is_main else {}
                    record = {"step": step, "loss": loss, "samples_per_s": rate, **metrics}
                    if ctx.is_main:
                        with log_file.open("a") as handle:
                            handle.write(json.dumps(record) + "\n")
                        bar.write(" ".join(f"{k}={v:.4g}" for k, v in record.items()))
                saved = _due(step, checkpoint_every, steps)
                if ctx.is_main and saved:
                    save(step, metrics)
                stopped_by = _stop_signal(ctx, request)
                if stopped_by is not None:
                    if ctx.is_main and not saved:
                        save(step, {})  # no validation at this step: metrics stay empty
                    if ctx.is_main:
                        log.info(
                            "%s: %s at step %d/%d; saved %s (continue with --resume)",
                            desc,
                            signal.Signals(stopped_by).name,
                            step,
                            steps,
                            out / "last",
                        )
                    break
        finally:
            bar.close()
    ctx.barrier()
    if stopped_by is not None:
        raise stop_exception(stopped_by)
    return metrics
