"""The receiver's compute stage: one micro-batch in, complete frame sets handed to the tasks.

``ImputeStage`` owns what a batch needs after ingest: the model on its device, the imputer,
the decoder and the task hooks. The single-process receiver runs one in its worker thread; a
cluster worker runs one per Ray actor, so the two paths impute, decode and count alike.
"""

from __future__ import annotations

import logging
import time
import zlib
from collections import deque
from collections.abc import Sequence

import torch

from mvld.common.default_model import DEFAULT_MODEL
from mvld.common.errors import ConfigError
from mvld.model.checkpoint import MVLDModel, load_mvld_model
from mvld.receiver.batcher import Batch
from mvld.receiver.config import ReceiverConfig
from mvld.receiver.decoder import LatentDecoder
from mvld.receiver.hooks import Hook, HookRunner, build_hooks
from mvld.receiver.imputation import Imputer, Provenance, log_model_verdict
from mvld.receiver.ingest import PendingFrameSet, camera_layout
from mvld.receiver.memory import CameraMemory
from mvld.receiver.observability import ReceiverMetrics
from mvld.receiver.results import FrameSetResult
from mvld.receiver.ridge_imputer import RidgeImputer

__all__ = ["ImputeStage"]

log = logging.getLogger(__name__)


def node_seed(node_id: str) -> int:
    """The sampler seed of a node's frame sets: the same for all of them, so a camera's
    consecutive imputations share their noise and change only with the evidence (no
    flicker between independent samples); different for different nodes."""
    return zlib.crc32(node_id.encode())


class ImputeStage:
    """Impute -> decode -> hooks for micro-batches, with the counts the metrics report."""

    def __init__(
        self,
        config: ReceiverConfig,
        device: torch.device,
        metrics: ReceiverMetrics,
        *,
        model: MVLDModel | None = None,
        extra_hooks: Sequence[tuple[str, Hook]] = (),
    ) -> None:
        self.config, self.device, self.metrics = config, device, metrics
        self.model_source = str(config.model or DEFAULT_MODEL) if model is None else "in memory"
        if model is None:
            model = load_mvld_model(config.model, device)
            log_model_verdict(config.model or DEFAULT_MODEL)
        else:
            model.autoencoder.to(device)
            model.score_net.to(device)
        self.model = model
        self.layout = camera_layout(
            config.cameras,
            model.num_views,
            model.autoencoder.config.latent_dim,
            model.autoencoder.config.latent_shape,
        )
        self.imputer = self._build_imputer(in_memory=self.model_source == "in memory")
        self.decoder = LatentDecoder.from_model(model, precision=config.precision)
        self.hooks = build_hooks(config.tasks, metrics, extra_hooks)
        self._unconditioned_hooks = self._hooks_taking_unconditioned()
        self.memory = CameraMemory(
            model.num_views,
            self.layout.latent_dim,
            max_nodes=config.max_nodes,
            guard_frames=config.memory_guard_frames,
        )
        self.batches = 0
        self.recent_latency: deque[float] = deque(maxlen=2048)  # for the status line

    def _build_imputer(self, *, in_memory: bool) -> Imputer | RidgeImputer:
        config = self.config
        if config.imputer != "ridge":
            return Imputer.from_model(
                self.model, sampler=config.sampler, steps=config.steps, precision=config.precision
            )
        if in_memory and config.model is None:  # the packaged model's weights would not fit
            raise ConfigError(
                "--imputer ridge with a model given in memory needs --model: the "
                "checkpoint whose folder holds its ridge weights"
            )
        return RidgeImputer.beside(config.model or DEFAULT_MODEL, self.model)

    def _hooks_taking_unconditioned(self) -> HookRunner:
        """The tasks that get frame sets with no observed view: all with the flag, else those
        whose hook sets ``accepts_unconditioned = True``."""
        if self.config.deliver_unconditioned:
            return self.hooks
        return HookRunner(
            [
                (name, hook)
                for name, hook in self.hooks.hooks
                if getattr(hook, "accepts_unconditioned", False)
            ],
            self.metrics,
        )

    def process(self, items: list[PendingFrameSet]) -> list[FrameSetResult]:
        """Impute and decode one micro-batch into complete frame sets (no hooks, no drops)."""
        batch = Batch.stack(items, self.device)
        recall = self.memory.recall(items)  # kept even when unused: a later switch finds it
        memory = {}
        if self.config.camera_memory and getattr(self.imputer, "uses_memory", False) and recall.any:
            memory = {
                "memory": torch.from_numpy(recall.latents),
                "memory_age": torch.from_numpy(recall.age),
            }
        seeds = [node_seed(item.message.node_id) for item in items]
        imputation = self.imputer(
            batch.latents, batch.present, samples=self.config.samples, seed=seeds, **memory
        )
        self.batches += 1
        chosen = imputation.posterior_mean() if self.config.posterior_mean else imputation.latents
        start = time.perf_counter()
        images = self.decoder(chosen)  # [B, V, H, W, 3]
        self.metrics.decode_seconds.observe(time.perf_counter() - start)
        done = time.time()
        latents = chosen.float().cpu().numpy()
        uncertainty = None if imputation.uncertainty is None else imputation.uncertainty.numpy()
        results = [
            FrameSetResult.complete(
                item,
                self.layout,
                latents[b],
                images[b],
                imputation.provenance[b],
                None if uncertainty is None else uncertainty[b],
                done,
            )
            for b, item in enumerate(items)
        ]
        self._count(results, imputation.seconds)
        return results

    def _count(self, results: list[FrameSetResult], impute_seconds: float) -> None:
        metrics = self.metrics
        metrics.batch_size.observe(len(results))
        metrics.impute_seconds.observe(impute_seconds)
        for result in results:
            metrics.completed.inc()
            if result.clock_ok:  # an edge clock far off would poison the figures
                metrics.latency.observe(result.latency)
                self.recent_latency.append(result.latency)
            for provenance in Provenance:
                count = sum(v.provenance is provenance for v in result.views)
                if count:
                    metrics.views.inc(count, provenance=provenance.value)

    def handle(self, items: list[PendingFrameSet]) -> list[FrameSetResult]:
        """Withhold, impute, decode and hand one batch to the tasks; every loss is counted.

        Returns the results handed on. A failure inside imputation or decoding (a receiver
        bug) drops the batch with reason ``internal_error`` instead of ending the worker.
        """
        if not self._unconditioned_hooks.hooks:  # no task wants them: not even imputed
            kept = [item for item in items if item.present.any()]
            withheld = len(items) - len(kept)
            if withheld:
                self.metrics.withheld.inc(withheld, reason="no_observed_view")
            items = kept
            if not items:
                return []
        try:
            results = self.process(items)
        except Exception:
            self.metrics.drop("internal_error", len(items))
            log.exception("imputation or decoding failed for a batch of %d; dropped", len(items))
            return []
        for result in results:
            if result.observed_views:
                self.hooks(result)
            else:
                self._unconditioned_hooks(result)
        return results

    def hook_errors(self) -> int:
        """Errors raised by the tasks so far."""
        return int(sum(self.metrics.hook_errors.value(task=name) for name in self.hooks.names))

    def close(self) -> None:
        """Close the hooks (idempotent)."""
        self.hooks.close()
        self.hooks = HookRunner([], self.metrics)
        self._unconditioned_hooks = self.hooks
