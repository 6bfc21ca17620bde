"""Matrix-product and convolution throughput of this machine: the ceiling for the receiver.

The receiver's work is convolutions (the score network and the decoder of the packaged model),
so its speed is judged against what this CPU (or GPU) reaches on plain ``torch.mm`` and on the
model's own convolution shapes at the batch sizes the receiver runs (one frame set and 64):

- ``mm``: square 1024/2048 products (the machine's practical peak) and the im2col shapes of
  the model's 3x3 convolutions, in fp32 and bf16 (bf16 is emulated on CPUs without
  AVX512-BF16/AMX, which is why ``--precision auto`` keeps fp32 there);
- ``conv``: every distinct Conv2d / ConvTranspose2d of the packaged score network and decoder,
  NCHW and channels-last, GFLOP/s from the FLOP counter.

Each figure is the best of ``--repeats`` timed runs (the machine may be shared; the load
average is recorded). JSON to ``--out``; a table is printed.

    python bench/bench_cpu_peak.py --threads 1
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from mvld.hardware import cpu_name
from mvld.model.checkpoint import load_mvld_model

MM_SHAPES = ((1024, 1024, 1024), (2048, 2048, 2048), (4096, 1152, 128), (12288, 576, 64))
BF16_SHAPES = ((1024, 1024, 1024), (4096, 1152, 128))  # emulated bf16 can be 20x slower


def best_seconds(run: Callable[[], object], repeats: int, min_s: float = 0.05) -> float:
    """Best time of ``repeats`` runs, each repeating ``run`` for at least ``min_s``."""
    run()
    best = float("inf")
    for _ in range(repeats):
        count, start = 0, time.perf_counter()
        while True:
            run()
            count += 1
            elapsed = time.perf_counter() - start
            if elapsed >= min_s:
                break
        best = min(best, elapsed / count)
    return best


def bench_mm(
    dtype: torch.dtype, repeats: int, shapes: tuple[tuple[int, int, int], ...] = MM_SHAPES
) -> list[dict[str, object]]:
    """GFLOP/s of ``a @ b`` for each (M, K, N) of ``shapes``."""
    rows = []
    for m, k, n in shapes:
        a, b = torch.randn(m, k, dtype=dtype), torch.randn(k, n, dtype=dtype)
        seconds = best_seconds(lambda a=a, b=b: torch.mm(a, b), repeats)
        rows.append(
            {
                "m": m,
                "k": k,
                "n": n,
                "dtype": str(dtype).removeprefix("torch."),
                "ms": seconds * 1e3,
                "gflops": 2 * m * k * n / seconds / 1e9,
            }
        )
    return rows


def conv_layers(
    model: nn.Module, example: tuple[torch.Tensor, ...]
) -> list[tuple[nn.Module, torch.Tensor]]:
    """Each distinct convolution of ``model`` with the input it gets on ``example``."""
    seen: dict[tuple, tuple[nn.Module, torch.Tensor]] = {}
    hooks = []

    def record(module: nn.Module, inputs: tuple[torch.Tensor, ...], _: object) -> None:
        key = (
            type(module).__name__,
            tuple(inputs[0].shape),
            tuple(module.weight.shape),
            module.stride,
        )
        seen.setdefault(key, (module, inputs[0].detach().clone()))

    for module in model.modules():
        if isinstance(module, nn.Conv2d | nn.ConvTranspose2d):
            hooks.append(module.register_forward_hook(record))
    with torch.inference_mode():
        model(*example)
    for hook in hooks:
        hook.remove()
    return list(seen.values())


def bench_convs(
    name: str, model: nn.Module, example: tuple[torch.Tensor, ...], repeats: int
) -> list[dict[str, object]]:
    """GFLOP/s of every distinct convolution, NCHW and channels-last."""
    rows = []
    for module, x in conv_layers(model, example):
        with FlopCounterMode(display=False) as counter, torch.inference_mode():
            module(x)
        flops = counter.get_total_flops()
        row: dict[str, object] = {
            "net": name,
            "layer": type(module).__name__,
            "input": list(x.shape),
            "weight": list(module.weight.shape),
            "mflop": flops / 1e6,
        }
        for layout, fmt in (
            ("nchw", torch.contiguous_format),
            ("channels_last", torch.channels_last),
        ):
            layer = module.to(memory_format=fmt)
            inp = x.contiguous(memory_format=fmt)
            with torch.inference_mode():
                seconds = best_seconds(lambda layer=layer, inp=inp: layer(inp), repeats)
            row[f"{layout}_gflops"] = flops / seconds / 1e9
        module.to(memory_format=torch.contiguous_format)
        rows.append(row)
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--batch", type=int, default=64, help="frame sets for the conv shapes")
    parser.add_argument("--no-bf16", action="store_true", help="skip the bf16 products")
    parser.add_argument("--out", type=Path, default=Path("bench/results/cpu_peak.json"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model = load_mvld_model(None, "cpu")
    views, dims = model.latent_stats.mean.shape
    batch = args.batch
    mm = bench_mm(torch.float32, args.repeats)
    if not args.no_bf16:
        mm += bench_mm(torch.bfloat16, max(1, args.repeats // 2), BF16_SHAPES)
    convs = bench_convs(
        "score_net",
        model.score_net.eval(),
        (torch.randn(batch, views, dims), torch.rand(batch, views)),
        args.repeats,
    )
    convs += bench_convs(
        "decoder",
        model.autoencoder.decoder.eval(),
        (torch.randn(batch * views, dims),),
        args.repeats,
    )
    fp32 = [r["gflops"] for r in mm if r["dtype"] == "float32"]
    report = {
        "cpu": cpu_name(),
        "threads": args.threads,
        "logical_cpus": os.cpu_count(),
        "load_average_1m_at_end": os.getloadavg()[0],
        "torch": torch.__version__,
        "mm_peak_fp32_gflops": max(fp32),
        "mm": mm,
        "conv": convs,
        "command": " ".join(sys.argv),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1) + "\n")
    print(f"{report['cpu']}, {args.threads} thread(s), load {report['load_average_1m_at_end']:.1f}")
    for row in mm:
        print(f"mm {row['m']}x{row['k']}x{row['n']} {row['dtype']:<9} {row['gflops']:7.1f} GFLOP/s")
    for row in convs:
        print(
            f"{row['net']:<10}{row['layer']:<16}{row['input']!s:<20}{row['mflop']:9.1f} MFLOP"
            f"  nchw {row['nchw_gflops']:6.1f}  channels_last {row['channels_last_gflops']:6.1f}"
            " GFLOP/s"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
