"""Benchmark: ONNX Runtime versus torch eager for the encoder, decoder and score network.

Exports the model (a checkpoint given with ``--model``, else the default architecture randomly
initialised: speed does not depend on the weights) with ``mvld-export``'s exporter, then times
each graph at batch 1, 3 and 64 on the CPU with the same thread count for both runtimes.
Also times what the edge does per frame set: the shared preprocessing of three 640x480 camera
frames plus one batched encoder call, through the ONNX Runtime and torch encoder backends.
Writes JSON (hardware and versions named) and prints a table with the torch/ORT ratio.

    nice -n 10 python bench/bench_backends.py --threads 1 --out bench/results/backends.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch

from mvld.common.preprocess import PreprocessConfig, preprocess_images
from mvld.export.onnx_export import ExportOptions, export_model
from mvld.hardware import cpu_name
from mvld.model.autoencoder import Autoencoder, AutoencoderConfig
from mvld.model.checkpoint import (
    LatentStats,
    MVLDModel,
    encoder_fingerprint,
    load_mvld_model,
    save_mvld_model,
)
from mvld.model.score_net import ScoreNet, ScoreNetConfig
from mvld.model.sde import VPSDE

BATCHES = (1, 3, 64)


def default_model() -> MVLDModel:
    """The default architecture (64x64, latent 128, 3 views), randomly initialised."""
    torch.manual_seed(0)
    autoencoder = Autoencoder(AutoencoderConfig()).eval()
    score_net = ScoreNet(ScoreNetConfig()).eval()
    torch.nn.init.normal_(score_net.output.weight, std=0.01)
    views, dim = score_net.config.num_views, score_net.config.latent_dim
    return MVLDModel(
        PreprocessConfig(),
        autoencoder,
        score_net,
        VPSDE(),
        LatentStats(torch.zeros(views, dim), torch.ones(views, dim)),
        encoder_fingerprint(autoencoder.encoder),
    )


def time_call(call: Callable[[], object], min_seconds: float, min_repeats: int) -> float:
    """Median milliseconds per call after two warm-up calls."""
    call()
    call()
    samples: list[float] = []
    started = time.perf_counter()
    while len(samples) < min_repeats or time.perf_counter() - started < min_seconds:
        begin = time.perf_counter()
        call()
        samples.append(1e3 * (time.perf_counter() - begin))
    return statistics.median(samples)


def feeds_for(
    part: str, model: MVLDModel, batch: int, rng: np.random.Generator
) -> dict[str, np.ndarray]:
    """Random inputs of the right shape (timing does not depend on values)."""
    size = model.preprocess.image_size
    views, dim = model.num_views, model.autoencoder.config.latent_dim
    if part == "encoder":
        return {"images": rng.uniform(-1, 1, (batch, 3, *size)).astype(np.float32)}
    if part == "decoder":
        return {"latents": rng.standard_normal((batch, dim)).astype(np.float32)}
    return {
        "x": rng.standard_normal((batch, views, dim)).astype(np.float32),
        "tau": rng.uniform(0, 1, (batch, views)).astype(np.float32),
    }


def bench(model: MVLDModel, onnx_dir: Path, threads: int, min_seconds: float) -> list[dict]:
    """One row per (part, batch): ORT ms, torch ms, ratio."""
    torch.set_num_threads(threads)
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    modules = {
        "encoder": model.autoencoder.encoder,
        "decoder": model.autoencoder.decoder,
        "score_net": model.score_net,
    }
    rng = np.random.default_rng(0)
    rows = []
    for part, module in modules.items():
        session = ort.InferenceSession(
            str(onnx_dir / f"{part}.onnx"), options, providers=["CPUExecutionProvider"]
        )
        for batch in BATCHES:
            feeds = feeds_for(part, model, batch, rng)
            tensors = [torch.from_numpy(a) for a in feeds.values()]
            with torch.inference_mode():
                torch_ms = time_call(lambda m=module, t=tensors: m(*t), min_seconds, 5)
            ort_ms = time_call(lambda s=session, f=feeds: s.run(None, f), min_seconds, 5)
            rows.append(
                {
                    "part": part,
                    "batch": batch,
                    "onnxruntime_ms": round(ort_ms, 4),
                    "torch_ms": round(torch_ms, 4),
                    "onnxruntime_ms_per_item": round(ort_ms / batch, 4),
                    "torch_over_onnxruntime": round(torch_ms / ort_ms, 3),
                }
            )
            print(
                f"{part:10s} batch {batch:3d}: ORT {ort_ms:9.3f} ms  torch {torch_ms:9.3f} ms"
                f"  torch/ORT {torch_ms / ort_ms:5.2f}x",
                flush=True,
            )
    return rows


def bench_edge_encode(
    onnx_dir: Path, checkpoint: Path, threads: int, min_seconds: float
) -> list[dict]:
    """What the edge does per frame set: preprocess 3 camera frames (640x480) + one call."""
    from mvld.edge.encoder import OnnxRuntimeEncoder, TorchEncoder

    frames = [np.random.default_rng(i).integers(0, 256, (480, 640, 3), np.uint8) for i in range(3)]
    encoders = {
        "onnxruntime": OnnxRuntimeEncoder(onnx_dir, threads=threads),
        "torch": TorchEncoder(checkpoint, threads=threads),
    }
    timings = {
        name: time_call(lambda e=encoder: e.encode(frames), min_seconds, 5)
        for name, encoder in encoders.items()
    }
    config = encoders["onnxruntime"].preprocess
    preprocess_ms = time_call(lambda: preprocess_images(frames, config), min_seconds, 5)
    print(
        f"edge encode 3x640x480 frames: ORT {timings['onnxruntime']:.3f} ms  "
        f"torch {timings['torch']:.3f} ms  (preprocessing alone {preprocess_ms:.3f} ms)",
        flush=True,
    )
    return [
        {
            "part": "edge_encode_3x640x480",
            "batch": 3,
            "onnxruntime_ms": round(timings["onnxruntime"], 4),
            "torch_ms": round(timings["torch"], 4),
            "onnxruntime_ms_per_item": round(timings["onnxruntime"] / 3, 4),
            "torch_over_onnxruntime": round(timings["torch"] / timings["onnxruntime"], 3),
            "preprocessing_alone_ms": round(preprocess_ms, 4),
        }
    ]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, help="an mvld checkpoint (default: random init)")
    parser.add_argument("--threads", type=int, default=1, help="threads for both runtimes")
    parser.add_argument("--seconds", type=float, default=0.5, help="minimum time per cell")
    parser.add_argument("--exporter", choices=("dynamo", "torchscript"), default="dynamo")
    parser.add_argument("--out", type=Path, default=Path("bench/results/backends.json"))
    args = parser.parse_args(argv)
    load_before = round(os.getloadavg()[0], 2)  # other jobs on the machine skew timings
    with tempfile.TemporaryDirectory() as tmp:
        checkpoint = args.model or save_mvld_model(Path(tmp) / "model", default_model())
        model = load_mvld_model(checkpoint)
        export_model(checkpoint, Path(tmp) / "onnx", ExportOptions(exporter=args.exporter))
        rows = bench(model, Path(tmp) / "onnx", args.threads, args.seconds)
        rows += bench_edge_encode(Path(tmp) / "onnx", Path(checkpoint), args.threads, args.seconds)
    result = {
        "benchmark": "ONNX Runtime vs torch eager, CPU, median ms per call",
        "hardware": {
            "cpu": cpu_name(),
            "logical_cpus": os.cpu_count(),
            "machine": platform.machine(),
            "gpu": "none used (CPU benchmark)",
            "load_average_1min_before": load_before,
        },
        "versions": {
            "python": sys.version.split()[0],
            "torch": torch.__version__,
            "onnxruntime": ort.__version__,
        },
        "threads": args.threads,
        "exporter": args.exporter,
        "model": str(args.model) if args.model else "default architecture, random weights",
        "parameters": {
            "encoder": sum(p.numel() for p in model.autoencoder.encoder.parameters()),
            "decoder": sum(p.numel() for p in model.autoencoder.decoder.parameters()),
            "score_net": sum(p.numel() for p in model.score_net.parameters()),
        },
        "results": rows,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1))
    print(
        f"hardware: {result['hardware']['cpu']} ({os.cpu_count()} logical CPUs), "
        f"{args.threads} thread(s); written {args.out}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
