"""Receiver benchmark: edge (3 simulated cameras at 30 FPS, one failing) -> receiver -> hook.

Runs against an in-process ``ReceiverService`` (the same code ``mvld-receiver`` runs) with the
default 20-evaluation sampler (DPM-Solver++(2M) SDE, 20 steps) on ``--gpu`` (-1 = CPU), each
at the receiver's defaults and ``tuned`` (``--tuned-budget-ms``, a larger latency budget that
buys throughput with latency). Every frame-set rate counts the whole path: imputation,
decoding of all three views and the hook. Achieved GFLOP/s = frame sets/s x (NFE x score
FLOP + views x decoder FLOP), against ``torch.mm`` fp32 measured here (``bench_cpu_peak.py``):

- ``latency``: the real ``mvld-edge`` in a child process, cameras ``sim://0``, a missing video
  file (camera 1 fails: the edge reports it failed and keeps trying to reopen it) and
  ``sim://2`` at 30 FPS, ONNX Runtime encoder, one thread. A hook records capture-to-hook
  latency (hook call time minus the earliest capture time of the frame set; one machine, one
  clock): p50 / p90 / p99 / max, and the provenance of the views delivered.
- ``saturation``: a flood child process (``--flood``) with ``--nodes`` publishers, one
  connection each, sending real encoded frame sets (simulated rig views, camera 1 failed) as
  fast as ``--node-rate`` allows; reported: completed frame sets per second, views per second,
  mean batch size, drops by reason, latency at saturation.

- ``kernels``: one batch-64 imputation and decode outside the service (the ceiling of the
  arithmetic itself), and the quality and speed of each precision (PSNR of the decoded views
  against plain fp32; bf16 is emulated, so slow, on CPUs without AVX512-BF16/AMX).

The model is ``--model`` or the packaged default; without either, a randomly initialised model
of the default architecture (64x64, 3 views x 64 dims, score widths 512/256/128) is used: the
timing depends on the architecture, not the weights. The machine may be shared: the load
average is recorded. JSON goes to ``--out``; a table is printed.

    python bench/bench_receiver.py                     # about 3 minutes
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
from bench_cpu_peak import bench_mm
from torch.utils.flop_counter import FlopCounterMode

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
from mvld.receiver.decoder import LatentDecoder
from mvld.receiver.imputation import Imputer
from mvld.receiver.precision import choose_threads, resolve_precision
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
    model = MVLDModel(
        PreprocessConfig(),
        autoencoder,
        score_net,
        VPSDE(),
        LatentStats(torch.zeros(3, config.latent_dim), torch.ones(3, config.latent_dim)),
        encoder_fingerprint(autoencoder.encoder),
    )
    return save_mvld_model(work / "model", model), "random weights, default architecture"


def sampler_nfe(checkpoint: Path) -> int:
    """Score evaluations the receiver's default sampler spends on one frame set."""
    model = load_mvld_model(checkpoint, "cpu")
    views, dims = model.latent_stats.mean.shape
    imputer = Imputer.from_model(model, sampler=ReceiverConfig.sampler, steps=ReceiverConfig.steps)
    return imputer(torch.zeros(1, views, dims), torch.tensor([[True, False, True]])).nfe


def model_flops(checkpoint: Path) -> dict[str, float]:
    """FLOP of one score evaluation per frame set and of decoding one view (FLOP counter)."""
    model = load_mvld_model(checkpoint, "cpu")
    views, dims = model.latent_stats.mean.shape
    with torch.inference_mode():
        with FlopCounterMode(display=False) as score:
            model.score_net(torch.zeros(1, views, dims), torch.zeros(1, views))
        with FlopCounterMode(display=False) as decode:
            model.autoencoder.decoder(torch.zeros(1, dims))
    return {
        "score_eval": float(score.get_total_flops()),
        "decode_view": float(decode.get_total_flops()),
        "views": float(views),
    }


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    """PSNR in dB of uint8 images ``a`` against ``b``."""
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return float("inf") if mse == 0 else 10 * np.log10(255.0**2 / mse)


def run_kernels(checkpoint: Path, gpu: int, batch: int, quality_batch: int) -> dict[str, object]:
    """Batch-``batch`` imputation and decoding outside the service, per precision, with the
    PSNR of each precision's decoded views against the network run as stored (fp32, NCHW)."""
    device = (
        torch.device("cuda", gpu)
        if gpu >= 0 and torch.cuda.is_available()
        else (torch.device("cpu"))
    )
    model = load_mvld_model(checkpoint, device)
    views, dims = model.latent_stats.mean.shape
    present = torch.tensor([[True, False, True]]).repeat(batch, 1).to(device)
    latents = (
        torch.from_numpy(np.stack([f for f, _ in flood_frame_sets(checkpoint, batch)]))
        .reshape(batch, views, dims)
        .float()
        .to(device)
    )
    choices = ["fp32", "bf16"] + (["fp16"] if device.type == "cuda" else [])
    auto = str(resolve_precision("auto", device)).removeprefix("torch.")
    reference = None
    rows: dict[str, dict[str, object]] = {}
    for name in ["as stored", *choices]:
        precision = None if name == "as stored" else name
        imputer = Imputer.from_model(model, precision=precision)
        decoder = LatentDecoder.from_model(model, precision=precision)
        fast = name == "as stored" or name == "fp32" or name == auto
        size = batch if fast else quality_batch  # emulated bf16: a small batch suffices
        imputer(latents[:size], present[:size])  # warm-up
        start = time.perf_counter()
        imputation = imputer(latents[:size], present[:size])
        impute_s = time.perf_counter() - start
        decoder(imputation.latents[:1])
        start = time.perf_counter()
        images = decoder(imputation.latents)
        decode_s = time.perf_counter() - start
        rows[name] = {
            "batch": size,
            "impute_s": impute_s,
            "decode_s": decode_s,
            "framesets_per_s": size / (impute_s + decode_s),
            "psnr_vs_stored_db": None if reference is None else psnr(images, reference[:size]),
        }
        if reference is None:
            reference = images
    return {"device": str(device), "auto": auto, "precisions": rows}


def export_encoder(checkpoint: Path, work: Path) -> Path:
    """ONNX export of the encoder for the edge's default CPU backend."""
    from mvld.export.onnx_export import ExportOptions, export_model

    export_model(
        checkpoint, work / "onnx", ExportOptions(exporter="torchscript", parts=("encoder",))
    )
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
            self.provenance[view.provenance.value] = (
                self.provenance.get(view.provenance.value, 0) + 1
            )


def percentiles(seconds: list[float]) -> dict[str, float | int]:
    """p50/p90/p99/max in milliseconds."""
    if not seconds:
        return {"count": 0}
    ms = np.array(seconds) * 1e3
    return {
        "count": len(ms),
        "p50_ms": float(np.percentile(ms, 50)),
        "p90_ms": float(np.percentile(ms, 90)),
        "p99_ms": float(np.percentile(ms, 99)),
        "max_ms": float(ms.max()),
    }


def receiver(
    checkpoint: Path, gpu: int, recorder: LatencyRecorder, **config: object
) -> ReceiverService:
    """An in-process receiver on a free loopback port with the recorder as its only task."""
    model = load_mvld_model(checkpoint, "cpu")
    service = ReceiverService(
        ReceiverConfig(bind=("tcp://127.0.0.1:0",), gpu=gpu, status_every_s=5.0, **config),
        model=model,
        extra_hooks=[("latency", recorder)],
    )
    service.start()
    return service


def measure(
    service: ReceiverService, recorder: LatencyRecorder, warmup_s: float, seconds: float
) -> dict[str, object]:
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
    drops = {
        k: v - drops_before.get(k, 0)
        for k, v in metrics.drops().items()
        if v - drops_before.get(k, 0)
    }
    return {
        "seconds": elapsed,
        "framesets_completed": int(completed),
        "framesets_per_s": completed / elapsed,
        "views_per_s": completed * service.layout.num_views / elapsed,
        "mean_batch": completed / batches if batches else 0.0,
        "drops": drops,
        "latency": percentiles(recorder.latencies),
        "provenance": recorder.provenance,
    }


def run_latency(
    checkpoint: Path, onnx: Path, gpu: int, seconds: float, **config: object
) -> dict[str, object]:
    """The real edge node, 3 sim cameras at 30 FPS with camera 1 failing, into the receiver."""
    recorder = LatencyRecorder()
    service = receiver(checkpoint, gpu, recorder, **config)
    scene = f"fps={FPS}&episode_frames=100000"
    cams = f"sim://0?{scene},/nonexistent/camera1.mp4,sim://2?{scene}"
    edge = subprocess.Popen(
        [
            sys.executable,
            "-c",
            RUN_EDGE,
            "--cams",
            cams,
            "--connect",
            service.endpoints[0],
            "--model",
            str(onnx),
            "--backend",
            "onnxruntime",
            "--threads",
            "1",
            "--fps",
            str(FPS),
            "--node-id",
            "bench-edge",
            "--status-every",
            "5",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
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
    return {
        "edge": "mvld-edge, cams sim://0, missing file (fails), sim://2; onnxruntime, 1 thread",
        "fps": FPS,
        "config": config,
        **result,
    }


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
            views = (
                ViewRecord("cam0", ViewStatus.OK, ReasonCode.NONE, now, latents[0]),
                ViewRecord("cam1", ViewStatus.FAILED, ReasonCode.DISCONNECTED, None),
                ViewRecord("cam2", ViewStatus.OK, ReasonCode.NONE, now, latents[2]),
            )
            publisher.send(
                encode_frameset(FrameSetMessage(f"flood-{node}", seq, now, fingerprint, views))
            )
        seq += 1
        time.sleep(max(0.0, start + seq * period - time.monotonic()))
    for publisher in publishers:
        publisher.close()


def run_saturation(
    checkpoint: Path, gpu: int, seconds: float, nodes: int, node_rate: float, **config: object
) -> dict[str, object]:
    """Offer more frame sets than the receiver can impute; measure what it completes."""
    recorder = LatencyRecorder()
    service = receiver(checkpoint, gpu, recorder, **config)
    child = subprocess.Popen(
        [
            sys.executable,
            __file__,
            "--flood",
            service.endpoints[0],
            "--model",
            str(checkpoint),
            "--nodes",
            str(nodes),
            "--node-rate",
            str(node_rate),
            "--seconds",
            str(seconds + 15),
        ],
        stderr=subprocess.PIPE,
        text=True,
    )
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
    return {
        "nodes": nodes,
        "offered_framesets_per_s": nodes * node_rate,
        "config": config,
        **result,
    }


def add_flops(run: dict, flops_per_frameset: float, peak_gflops: float) -> None:
    """Achieved GFLOP/s of a run and its fraction of the measured matmul peak."""
    run["gflops"] = run["framesets_per_s"] * flops_per_frameset / 1e9
    run["fraction_of_mm_peak"] = run["gflops"] / peak_gflops


RUNS = ("latency_defaults", "latency_tuned", "saturation_defaults", "saturation_tuned")


def print_table(report: dict) -> None:
    print(
        f"device: {report['device']}, {report['torch_threads']} torch thread(s), load "
        f"{report['load_average_1m_at_end']:.1f}; model: {report['model']}; sampler "
        f"{report['sampler']} {report['steps']} steps ({report['nfe']} NFE); "
        f"{report['gflop_per_frameset']:.2f} GFLOP per frame set; torch.mm fp32 peak "
        f"{report['mm_peak_fp32_gflops']:.1f} GFLOP/s"
    )
    print(
        f"{'run':<21}{'frame sets/s':>13}{'batch':>7}{'p50 ms':>8}{'p99 ms':>9}"
        f"{'GFLOP/s':>9}{'of peak':>8}  drops"
    )
    for name in RUNS:
        run = report[name]
        latency = run["latency"]
        print(
            f"{name:<21}{run['framesets_per_s']:>13.1f}{run['mean_batch']:>7.1f}"
            f"{latency.get('p50_ms', 0):>8.0f}{latency.get('p99_ms', 0):>9.0f}"
            f"{run['gflops']:>9.1f}{run['fraction_of_mm_peak']:>8.0%}  "
            f"{run['drops'] or 'none'}"
        )
    kernels = report["kernels"]
    print(
        f"batch-{report['kernel_batch']} kernels on {kernels['device']} (auto = {kernels['auto']}):"
    )
    for name, row in kernels["precisions"].items():
        psnr_db = row["psnr_vs_stored_db"]
        print(
            f"  {name:<10} batch {row['batch']:>3}: impute {row['impute_s']:7.2f} s"
            f" ({row.get('impute_gflops', 0):5.1f} GFLOP/s, {row.get('impute_of_peak', 0):4.0%}"
            f" of peak), decode {row['decode_s']:6.2f} s ({row.get('decode_gflops', 0):5.1f}"
            f" GFLOP/s), {row['framesets_per_s']:5.1f} frame sets/s, PSNR vs stored "
            f"{'-' if psnr_db is None else f'{psnr_db:.1f} dB'}"
        )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gpu", type=int, default=-1, help="-1 = CPU (default)")
    parser.add_argument("--model", help="checkpoint (default: packaged, else random weights)")
    parser.add_argument("--seconds", type=float, default=10.0, help="measured time per run")
    parser.add_argument("--nodes", type=int, default=16, help="saturation: publishers")
    parser.add_argument("--node-rate", type=float, default=60.0, help="saturation: Hz each")
    parser.add_argument(
        "--tuned-budget-ms", type=float, default=1000.0, help="the tuned runs' --latency-budget-ms"
    )
    parser.add_argument("--kernel-batch", type=int, default=64)
    parser.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch threads for every run (default: the receiver's choice)",
    )
    parser.add_argument("--out", type=Path, default=Path("bench/results/receiver.json"))
    parser.add_argument("--flood", metavar="ENDPOINT", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.flood:
        flood(args.flood, Path(args.model), args.nodes, args.node_rate, args.seconds)
        return 0
    threads = choose_threads(args.threads)
    torch.set_num_threads(threads)
    peak = max(row["gflops"] for row in bench_mm(torch.float32, repeats=5))
    common = {} if args.threads is None else {"threads": args.threads}
    tuned = {**common, "latency_budget_ms": args.tuned_budget_ms}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        checkpoint, model_source = model_checkpoint(args.model, work)
        onnx = export_encoder(checkpoint, work)
        nfe = sampler_nfe(checkpoint)
        flops = model_flops(checkpoint)
        per_frameset = nfe * flops["score_eval"] + flops["views"] * flops["decode_view"]
        runs = {
            "latency_defaults": run_latency(checkpoint, onnx, args.gpu, args.seconds, **common),
            "latency_tuned": run_latency(checkpoint, onnx, args.gpu, args.seconds, **tuned),
            "saturation_defaults": run_saturation(
                checkpoint, args.gpu, args.seconds, args.nodes, args.node_rate, **common
            ),
            "saturation_tuned": run_saturation(
                checkpoint, args.gpu, args.seconds, args.nodes, args.node_rate, **tuned
            ),
        }
        kernels = run_kernels(checkpoint, args.gpu, args.kernel_batch, quality_batch=2)
    for run in runs.values():
        add_flops(run, per_frameset, peak)
    for row in kernels["precisions"].values():
        row["impute_gflops"] = row["batch"] * nfe * flops["score_eval"] / row["impute_s"] / 1e9
        row["impute_of_peak"] = row["impute_gflops"] / peak
        row["decode_gflops"] = (
            row["batch"] * flops["views"] * flops["decode_view"] / row["decode_s"] / 1e9
        )
    cuda = args.gpu >= 0 and torch.cuda.is_available()
    report = {
        "device": torch.cuda.get_device_name(args.gpu) if cuda else f"CPU ({cpu_name()})",
        "torch_threads": torch.get_num_threads(),
        "logical_cpus": os.cpu_count(),
        "load_average_1m_at_end": os.getloadavg()[0],
        "model": model_source,
        "sampler": ReceiverConfig.sampler,
        "steps": ReceiverConfig.steps,
        "nfe": nfe,
        "flops": flops,
        "gflop_per_frameset": per_frameset / 1e9,
        "mm_peak_fp32_gflops": peak,
        "kernel_batch": args.kernel_batch,
        **runs,
        "kernels": kernels,
        "command": " ".join(sys.argv),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1) + "\n")
    print_table(report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
