"""Cluster benchmark: the receiver's stage on 1 vs N Ray workers, and the ingest's own rate.

Runs, all on this machine with the same model, sampler and flood:

- ``in_process``: the single-process ``ReceiverService`` (the baseline without Ray);
- ``workers_1`` .. ``workers_N``: ``ClusterReceiverService`` with 1 .. N local CPU workers,
  one torch thread each (a local Ray sized for them, as ``mvld-receiver --workers N`` starts).

Each run is offered more than it can impute by the flood of ``bench/bench_receiver.py``
(``--nodes`` publishers in a child process, one connection each, real rig views encoded by
the model, camera 1 failed) and reports completed frame sets per second and capture-to-done
latency p50/p99 at saturation, measured over ``--seconds`` after a warm-up. Ratios are against
``workers_1``. ``ingest`` times what the driver does per message on one thread: wire decode +
validation + assembly (``Ingest.check``), queueing (``NodeBacklog.put``) and pickling a batch
for a worker, on edge-style messages (3 int8 views); that gives the messages per second one
ingest process can take. JSON goes to ``--out``; a table is printed. The machine may be
shared: the load average is recorded.

    nice -n 10 python bench/bench_cluster.py                    # packaged model, 2 workers
    python bench/bench_cluster.py --workers 4 --seconds 20 --out bench/results/cluster_4.json
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mvld.common.default_model import DEFAULT_MODEL
from mvld.common.transport import LatentSubscriber
from mvld.common.wire import (
    FrameSetMessage,
    ReasonCode,
    ViewRecord,
    ViewStatus,
    encode_frameset,
    quantize_latent,
)
from mvld.hardware import cpu_name
from mvld.model.checkpoint import load_mvld_model
from mvld.receiver.cluster import ClusterReceiverService, import_ray
from mvld.receiver.config import ReceiverConfig
from mvld.receiver.imputation import Imputer
from mvld.receiver.ingest import Ingest, NodeBacklog, camera_layout
from mvld.receiver.observability import ReceiverMetrics
from mvld.receiver.service import ReceiverService

FLOOD = Path(__file__).with_name("bench_receiver.py")


def percentiles(seconds: list[float]) -> dict[str, float | int]:
    """p50/p99 in milliseconds."""
    if not seconds:
        return {"count": 0}
    ms = np.array(seconds) * 1e3
    return {
        "count": len(ms),
        "p50_ms": float(np.percentile(ms, 50)),
        "p99_ms": float(np.percentile(ms, 99)),
    }


def measure(
    service: ReceiverService | ClusterReceiverService, warmup_s: float, seconds: float
) -> dict[str, Any]:
    """Completed frame sets per second and latency over ``seconds`` after ``warmup_s``."""
    time.sleep(warmup_s)
    metrics = service.metrics
    recent = (
        service.recent_latency
        if isinstance(service, ClusterReceiverService)
        else service.stage.recent_latency
    )
    drops_before, completed_before = metrics.drops(), metrics.completed.value()
    batches_before = metrics.batch_size.count()
    recent.clear()
    start = time.monotonic()
    time.sleep(seconds)
    elapsed = time.monotonic() - start
    completed = metrics.completed.value() - completed_before
    batches = metrics.batch_size.count() - batches_before
    drops = {
        k: v - drops_before.get(k, 0)
        for k, v in metrics.drops().items()
        if v - drops_before.get(k, 0)
    }
    result: dict[str, Any] = {
        "seconds": elapsed,
        "framesets_completed": int(completed),
        "framesets_per_s": completed / elapsed,
        "mean_batch": completed / batches if batches else 0.0,
        "drops": drops,
        "latency": percentiles(list(recent)),
    }
    if isinstance(service, ClusterReceiverService):
        status = service.status(elapsed, completed_before)
        result["per_worker_completed"] = {
            name: w["completed"] for name, w in status["workers"].items()
        }
    return result


def run(
    name: str,
    workers: int,
    config: ReceiverConfig,
    checkpoint: Path,
    nodes: int,
    node_rate: float,
    seconds: float,
) -> dict[str, Any]:
    """One saturation run: start the receiver, flood it, measure, stop."""
    service: ReceiverService | ClusterReceiverService
    if workers:
        service = ClusterReceiverService(replace(config, workers=workers))
    else:
        service = ReceiverService(config)
    service.start()
    child = subprocess.Popen(
        [
            sys.executable,
            str(FLOOD),
            "--flood",
            service.endpoints[0],
            "--model",
            str(checkpoint),
            "--nodes",
            str(nodes),
            "--node-rate",
            str(node_rate),
            "--seconds",
            str(seconds + 60),
        ],
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + 120
        while service.metrics.completed.value() == 0:
            if child.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(
                    f"{name}: the flood delivered nothing: "
                    f"{child.stderr.read()[-2000:] if child.stderr else ''}"
                )
            time.sleep(0.1)
        result = measure(service, warmup_s=3.0, seconds=seconds)
    finally:
        child.terminate()
        child.wait(timeout=20)
        service.close()
    print(f"{name}: {result['framesets_per_s']:.2f} frame sets/s", file=sys.stderr)
    return {"workers": workers, "offered_framesets_per_s": nodes * node_rate, **result}


def sampler_nfe(checkpoint: Path, config: ReceiverConfig) -> int:
    """Score evaluations the configured sampler spends on one frame set (camera 1 missing)."""
    model = load_mvld_model(checkpoint, "cpu")
    views, dims = model.latent_stats.mean.shape
    imputer = Imputer.from_model(model, sampler=config.sampler, steps=config.steps)
    return imputer(torch.zeros(1, views, dims), torch.tensor([[True, False, True]])).nfe


def edge_message(model: Any, node: str, seq: int) -> bytes:
    """A message as ``mvld-edge`` sends it: 3 views, int8 latents of the model's shape."""
    rng = np.random.default_rng(seq)
    shape = model.autoencoder.config.latent_shape
    now = time.time()
    views = tuple(
        ViewRecord(
            f"cam{i}",
            ViewStatus.OK,
            ReasonCode.NONE,
            now,
            quantize_latent(rng.standard_normal(shape).astype(np.float32)),
        )
        for i in range(3)
    )
    return encode_frameset(FrameSetMessage(node, seq, now, model.fingerprint, views))


def ingest_rate(checkpoint: Path, messages: int = 20000, nodes: int = 1000) -> dict[str, Any]:
    """Per message on one thread: decode + validate, then queueing, then batch pickling."""
    model = load_mvld_model(checkpoint, "cpu")
    layout = camera_layout(
        (),
        model.num_views,
        model.autoencoder.config.latent_dim,
        model.autoencoder.config.latent_shape,
    )
    metrics = ReceiverMetrics()
    backlog = NodeBacklog(metrics, per_node=4, max_nodes=nodes, max_age_s=3600.0)
    with LatentSubscriber("tcp://127.0.0.1:0") as subscriber:
        ingest = Ingest(subscriber, layout, model.fingerprint, backlog, metrics)
        data = [edge_message(model, f"edge-{i % nodes}", i // nodes) for i in range(messages)]
        start = time.perf_counter()
        items = [ingest.check(d, None, time.time()) for d in data]
        check_s = time.perf_counter() - start
        start = time.perf_counter()
        for item in items:
            backlog.put(item)
        put_s = time.perf_counter() - start
    return {
        "messages": messages,
        "message_bytes": len(data[0]),
        "check_per_s": messages / check_s,
        "put_per_s": messages / put_s,
        "driver_per_s": messages / (check_s + put_s),
    }


def print_table(report: dict[str, Any]) -> None:
    print(
        f"CPU: {report['cpu']} ({report['logical_cpus']} logical, load "
        f"{report['load_average_1m_at_end']:.1f}); model: {report['model']}; sampler "
        f"{report['sampler']} {report['steps']} steps ({report['nfe']} NFE)"
    )
    print(
        f"{'run':<12}{'workers':>8}{'frame sets/s':>14}{'ratio':>7}{'batch':>7}"
        f"{'p50 ms':>9}{'p99 ms':>9}  drops"
    )
    for name, run_ in report["runs"].items():
        latency = run_["latency"]
        ratio = run_.get("ratio_to_1_worker")
        print(
            f"{name:<12}{run_['workers']:>8}{run_['framesets_per_s']:>14.2f}"
            f"{'' if ratio is None else f'{ratio:.2f}':>7}{run_['mean_batch']:>7.1f}"
            f"{latency.get('p50_ms', 0):>9.0f}{latency.get('p99_ms', 0):>9.0f}  "
            f"{run_['drops'] or 'none'}"
        )
    ingest = report["ingest"]
    print(
        f"ingest, one thread: {ingest['check_per_s']:.0f} msg/s decode+validate, "
        f"{ingest['put_per_s']:.0f} msg/s queue; {ingest['driver_per_s']:.0f} msg/s both; "
        f"{ingest['message_bytes']} B per message"
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="checkpoint (default: the packaged model)")
    parser.add_argument("--workers", type=int, default=2, help="the largest run (default 2)")
    parser.add_argument("--seconds", type=float, default=15.0, help="measured time per run")
    parser.add_argument("--nodes", type=int, default=8, help="flood publishers")
    parser.add_argument("--node-rate", type=float, default=10.0, help="Hz per publisher")
    parser.add_argument("--steps", type=int, default=ReceiverConfig.steps)
    parser.add_argument("--max-batch", type=int, default=16)
    parser.add_argument(
        "--no-in-process", action="store_true", help="skip the single-process baseline"
    )
    parser.add_argument("--out", type=Path, default=Path("bench/results/cluster.json"))
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    checkpoint = Path(args.model) if args.model else DEFAULT_MODEL
    config = ReceiverConfig(
        bind=("tcp://127.0.0.1:0",),
        gpu=-1,
        model=str(checkpoint),
        threads=1,
        steps=args.steps,
        max_batch=args.max_batch,
        status_every_s=60.0,
    )
    nfe = sampler_nfe(checkpoint, config)
    ingest = ingest_rate(checkpoint)
    import_ray()  # fail early, naming the extra
    runs: dict[str, dict[str, Any]] = {}
    if not args.no_in_process:
        runs["in_process"] = run(
            "in_process", 0, config, checkpoint, args.nodes, args.node_rate, args.seconds
        )
    for workers in range(1, args.workers + 1):
        runs[f"workers_{workers}"] = run(
            f"workers_{workers}",
            workers,
            config,
            checkpoint,
            args.nodes,
            args.node_rate,
            args.seconds,
        )
    one = runs["workers_1"]["framesets_per_s"]
    for result in runs.values():
        result["ratio_to_1_worker"] = result["framesets_per_s"] / one if one else None
    report = {
        "cpu": cpu_name(),
        "logical_cpus": os.cpu_count(),
        "load_average_1m_at_end": os.getloadavg()[0],
        "model": "packaged default" if not args.model else args.model,
        "sampler": config.sampler,
        "steps": config.steps,
        "nfe": nfe,
        "torch_threads_per_worker": 1,
        "max_batch": args.max_batch,
        "nodes": args.nodes,
        "node_rate_hz": args.node_rate,
        "runs": runs,
        "ingest": ingest,
        "command": " ".join(sys.argv),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1) + "\n")
    print_table(report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
