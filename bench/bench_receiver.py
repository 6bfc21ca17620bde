"""Receiver benchmark: edge (3 simulated cameras at 30 FPS, one failing) -> receiver -> hook.

Two runs against an in-process ``ReceiverService`` (the same code ``mvld-receiver`` runs) with
the default 20-evaluation sampler (DPM-Solver++(2M), 20 steps) on ``--gpu`` (-1 = CPU):

- ``latency``: the real ``mvld-edge`` in a child process, cameras ``sim://0``, a missing video
  file (camera 1 fails: the edge reports it failed and keeps trying to reopen it) and
  ``sim://2`` at 30 FPS, ONNX Runtime encoder, one thread. A hook records capture-to-hook
  latency (hook call time minus the earliest capture time of the frame set; one machine, one
  clock): p50 / p90 / p99 / max, and the provenance of the views delivered.
- ``saturation``: a flood child process (``--flood``) with ``--nodes`` publishers, one
  connection each, sending real encoded frame sets (simulated rig views, camera 1 failed) as
  fast as ``--node-rate`` allows; reported: completed frame sets per second, views per second,
  mean batch size, drops by reason, latency at saturation.

The model is ``--model`` or the packaged default; without either, a randomly initialised model
of the default architecture (64x64, 3 views x 64 dims, score widths 512/256/128) is used: the
timing depends on the architecture, not the weights. The machine may be shared: the load
average is recorded. JSON goes to ``--out``; a table is printed.

    python bench/bench_receiver.py                     # about 1 minute
    python bench/bench_receiver.py --gpu 0 --out bench/results/receiver_gpu.json
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from mvld.common.default_model import DEFAULT_MODEL
from mvld.common.preprocess import PreprocessConfig, preprocess_images
from mvld.common.transport import LatentPublisher
from mvld.common.wire import FrameSetMessage, ReasonCode, ViewRecord, ViewStatus, encode_frameset
from mvld.hardware import cpu_name
from mvld.model.autoencoder import Autoencoder, AutoencoderConfig
from mvld.model.checkpoint import (
    LatentStats,
    MVLDModel,
    checkpoint_paths,
    encoder_fingerprint,
    load_mvld_model,
    save_mvld_model,
)
from mvld.model.score_net import ScoreNet, ScoreNetConfig
from mvld.model.sde import VPSDE
from mvld.receiver.imputation import Imputer
from mvld.receiver.results import FrameSetResult
from mvld.receiver.service import ReceiverConfig, ReceiverService

RUN_EDGE = "import sys; from mvld.edge.cli import main; sys.exit(main())"
FPS = 30


def model_checkpoint(path: str | None, work: Path) -> tuple[Path, str]:
    """The checkpoint to use and how it was chosen."""
    if path:
        return Path(path), f"--model {path}"
    if checkpoint_paths(DEFAULT_MODEL)[0].is_file():
        return DEFAULT_MODEL, "packaged default model"
    torch.manual_seed(0)
    autoencoder = Autoencoder(AutoencoderConfig()).eval()
    score_net = ScoreNet(ScoreNetConfig()).eval()
    torch.nn.init.normal_(score_net.output.weight, std=0.02)  # zero-initialised otherwise
    config = autoencoder.config
    model = MVLDModel(PreprocessConfig(), autoencoder, score_net, VPSDE(),
                      LatentStats(torch.zeros(3, config.latent_dim),
                                  torch.ones(3, config.latent_dim)),
                      encoder_fingerprint(autoencoder.encoder))
    return save_mvld_model(work / "model", model), "random weights, default architecture"


def sampler_nfe(checkpoint: Path) -> int:
    """Score evaluations the receiver's default sampler spends on one frame set."""
    model = load_mvld_model(checkpoint, "cpu")
    views, dims = model.latent_stats.mean.shape
    imputer = Imputer.from_model(model, sampler=ReceiverConfig.sampler,
                                 steps=ReceiverConfig.steps)
    return imputer(torch.zeros(1, views, dims), torch.tensor([[True, False, True]])).nfe


def export_encoder(checkpoint: Path, work: Path) -> Path:
    """ONNX export of the encoder for the edge's default CPU backend."""
    from mvld.export.onnx_export import ExportOptions, export_model

    export_model(checkpoint, work / "onnx", ExportOptions(exporter="torchscript",
                                                          parts=("encoder",)))
    return work / "onnx"


class LatencyRecorder:
    """A hook: capture-to-hook seconds and view provenance of every frame set after warm-up."""

    def __init__(self) -> None:
        self.latencies: list[float] = []
        self.provenance: dict[str, int] = {}
        self.recording = False

    def __call__(self, result: FrameSetResult) -> None:
        now = time.time()
        if not self.recording:
            return
        self.latencies.append(now - result.capture_time)
        for view in result.views:
            self.provenance[view.provenance.value] = self.provenance.get(
                view.provenance.value, 0) + 1


def percentiles(seconds: list[float]) -> dict[str, float | int]:
    """p50/p90/p99/max in milliseconds."""
    if not seconds:
        return {"count": 0}
    ms = np.array(seconds) * 1e3
    return {"count": len(ms), "p50_ms": float(np.percentile(ms, 50)),
            "p90_ms": float(np.percentile(ms, 90)), "p99_ms": float(np.percentile(ms, 99)),
            "max_ms": float(ms.max())}


def receiver(checkpoint: Path, gpu: int, recorder: LatencyRecorder, **config: object
             ) -> ReceiverService:
    """An in-process receiver on a free loopback port with the recorder as its only task."""
    model = load_mvld_model(checkpoint, "cpu")
    service = ReceiverService(ReceiverConfig(bind=("tcp://127.0.0.1:0",), gpu=gpu,
                                             status_every_s=5.0, **config),
                              model=model, extra_hooks=[("latency", recorder)])
    service.start()
    return service


def measure(service: ReceiverService, recorder: LatencyRecorder, warmup_s: float,
            seconds: float) -> dict[str, object]:
    """Record for ``seconds`` after ``warmup_s``; rates from the completed-frame-set counter."""
    time.sleep(warmup_s)
    metrics = service.metrics
    drops_before, completed_before = metrics.drops(), metrics.completed.value()
    batches_before = metrics.batch_size.count()
    recorder.recording = True
    start = time.monotonic()
    time.sleep(seconds)
    recorder.recording = False
    elapsed = time.monotonic() - start
    completed = metrics.completed.value() - completed_before
    batches = metrics.batch_size.count() - batches_before
    drops = {k: v - drops_before.get(k, 0) for k, v in metrics.drops().items()
             if v - drops_before.get(k, 0)}
    return {"seconds": elapsed, "framesets_completed": int(completed),
            "framesets_per_s": completed / elapsed,
            "views_per_s": completed * service.layout.num_views / elapsed,
            "mean_batch": completed / batches if batches else 0.0, "drops": drops,
            "latency": percentiles(recorder.latencies), "provenance": recorder.provenance}


def run_latency(checkpoint: Path, onnx: Path, gpu: int, seconds: float) -> dict[str, object]:
    """The real edge node, 3 sim cameras at 30 FPS with camera 1 failing, into the receiver."""
    recorder = LatencyRecorder()
    service = receiver(checkpoint, gpu, recorder)
    scene = f"fps={FPS}&episode_frames=100000"
    cams = f"sim://0?{scene},/nonexistent/camera1.mp4,sim://2?{scene}"
    edge = subprocess.Popen(
        [sys.executable, "-c", RUN_EDGE, "--cams", cams, "--connect", service.endpoints[0],
         "--model", str(onnx), "--backend", "onnxruntime", "--threads", "1",
         "--fps", str(FPS), "--node-id", "bench-edge", "--status-every", "5"],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 60
        while service.metrics.completed.value() == 0:
            if edge.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"the edge delivered nothing: {edge.stderr.read()[-2000:]}")
            time.sleep(0.1)
        result = measure(service, recorder, warmup_s=2.0, seconds=seconds)
    finally:
        edge.terminate()
        edge.wait(timeout=20)
        service.close()
    return {"edge": "mvld-edge, cams sim://0, missing file (fails), sim://2; onnxruntime, "
                    "1 thread", "fps": FPS, **result}


def flood_frame_sets(checkpoint: Path, count: int = 32) -> list[tuple[np.ndarray, str]]:
    """``count`` frame sets of real rig views encoded by the model: cam0 and cam2 latents."""
    from mvld.sim.rig import RigConfig, SimRig

    model = load_mvld_model(checkpoint, "cpu")
    with SimRig(RigConfig(image_size=(model.preprocess.height, model.preprocess.width))) as rig:
        rig.reset(seed=0)
        views = []
        for _ in range(count):
            views.append(rig.render().views)
            rig.advance()
    images = preprocess_images([v for frame in views for v in frame], model.preprocess, "RGB")
    with torch.inference_mode():
        latents = model.autoencoder.encoder(torch.from_numpy(images)).numpy()
    shape = model.autoencoder.config.latent_shape  # the wire carries the model's exact shape
    return [(latents.reshape(count, 3, *shape)[i], model.fingerprint) for i in range(count)]


def flood(endpoint: str, checkpoint: Path, nodes: int, node_rate: float, seconds: float) -> None:
    """Child process: ``nodes`` publishers, each sending frame sets at ``node_rate`` Hz."""
    pool = flood_frame_sets(checkpoint)
    publishers = [LatentPublisher(endpoint, send_hwm=4) for _ in range(nodes)]
    period, start, seq = 1.0 / node_rate, time.monotonic(), 0
    while time.monotonic() - start < seconds:
        for node, publisher in enumerate(publishers):
            latents, fingerprint = pool[(seq + node) % len(pool)]
            now = time.time()
            views = (ViewRecord("cam0", ViewStatus.OK, ReasonCode.NONE, now, latents[0]),
                     ViewRecord("cam1", ViewStatus.FAILED, ReasonCode.DISCONNECTED, None),
                     ViewRecord("cam2", ViewStatus.OK, ReasonCode.NONE, now, latents[2]))
            publisher.send(encode_frameset(FrameSetMessage(f"flood-{node}", seq, now,
                                                           fingerprint, views)))
        seq += 1
        time.sleep(max(0.0, start + seq * period - time.monotonic()))
    for publisher in publishers:
        publisher.close()


def run_saturation(checkpoint: Path, gpu: int, seconds: float, nodes: int, node_rate: float,
                   max_batch: int) -> dict[str, object]:
    """Offer more frame sets than the receiver can impute; measure what it completes."""
    recorder = LatencyRecorder()
    service = receiver(checkpoint, gpu, recorder, max_batch=max_batch)
    child = subprocess.Popen(
        [sys.executable, __file__, "--flood", service.endpoints[0], "--model", str(checkpoint),
         "--nodes", str(nodes), "--node-rate", str(node_rate), "--seconds",
         str(seconds + 15)], stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 60
        while service.metrics.completed.value() == 0:
            if child.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"the flood delivered nothing: {child.stderr.read()[-2000:]}")
            time.sleep(0.1)
        result = measure(service, recorder, warmup_s=3.0, seconds=seconds)
    finally:
        child.terminate()
        child.wait(timeout=20)
        service.close()
    return {"nodes": nodes, "offered_framesets_per_s": nodes * node_rate,
            "max_batch": max_batch, **result}


def print_table(report: dict) -> None:
    print(f"device: {report['device']}; model: {report['model']}; sampler "
          f"{report['sampler']} {report['steps']} steps ({report['nfe']} NFE)")
    print(f"{'run':<11}{'frame sets/s':>13}{'views/s':>9}{'batch':>7}{'p50 ms':>8}"
          f"{'p99 ms':>8}{'max ms':>8}  drops")
    for name in ("latency", "saturation"):
        run = report[name]
        latency = run["latency"]
        print(f"{name:<11}{run['framesets_per_s']:>13.1f}{run['views_per_s']:>9.1f}"
              f"{run['mean_batch']:>7.1f}{latency.get('p50_ms', 0):>8.1f}"
              f"{latency.get('p99_ms', 0):>8.1f}{latency.get('max_ms', 0):>8.1f}  "
              f"{run['drops'] or 'none'}")
    print(f"latency run provenance: {report['latency']['provenance']}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gpu", type=int, default=-1, help="-1 = CPU (default)")
    parser.add_argument("--model", help="checkpoint (default: packaged, else random weights)")
    parser.add_argument("--seconds", type=float, default=10.0, help="measured time per run")
    parser.add_argument("--nodes", type=int, default=16, help="saturation: publishers")
    parser.add_argument("--node-rate", type=float, default=60.0, help="saturation: Hz each")
    parser.add_argument("--max-batch", type=int, default=64)
    parser.add_argument("--out", type=Path, default=Path("bench/results/receiver.json"))
    parser.add_argument("--flood", metavar="ENDPOINT", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.flood:
        flood(args.flood, Path(args.model), args.nodes, args.node_rate, args.seconds)
        return 0
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        checkpoint, model_source = model_checkpoint(args.model, work)
        onnx = export_encoder(checkpoint, work)
        nfe = sampler_nfe(checkpoint)
        latency = run_latency(checkpoint, onnx, args.gpu, args.seconds)
        saturation = run_saturation(checkpoint, args.gpu, args.seconds, args.nodes,
                                    args.node_rate, args.max_batch)
    cuda = args.gpu >= 0 and torch.cuda.is_available()
    report = {
        "device": torch.cuda.get_device_name(args.gpu) if cuda else f"CPU ({cpu_name()})",
        "torch_threads": torch.get_num_threads(), "logical_cpus": os.cpu_count(),
        "load_average_1m_at_end": os.getloadavg()[0], "model": model_source,
        "sampler": ReceiverConfig.sampler, "steps": ReceiverConfig.steps,
        "nfe": nfe, "latency": latency, "saturation": saturation,
        "command": " ".join(sys.argv),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1) + "\n")
    print_table(report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
