"""Writes an evaluation's outputs: ``summary.json``, ``summary.md``, PNG plots and image grids.

The markdown is what docs/RESULTS.md quotes; the JSON schema is documented in docs/EVAL.md.
Plots need matplotlib (the ``eval`` extra); without it they are skipped with a warning and
``summary.json`` lists no plot. Grids are composed with numpy and written with OpenCV.
"""

from __future__ import annotations

import json
import logging
import math
import os
from pathlib import Path

import cv2
import numpy as np

from mvld.train.evaluation import EvalResult, GridExample

log = logging.getLogger(__name__)

GRID_SCALE, GAP, INNER_GAP, HEADER = 1, 6, 2, 18
ALL = "all patterns (pooled)"


def _fmt(value: float | None, digits: int = 3) -> str:
    if value is None:
        return "-"
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return f"{value:.{digits}f}"


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    return [
        "| " + " | ".join(header) + " |",
        "|" + "---|" * len(header),
        *["| " + " | ".join(r) + " |" for r in rows],
    ]


def _metric_cells(row: dict) -> list[str]:
    fid = "-" if row["fid"] is None else f"{row['fid']:.1f} ({row['fid_views']})"
    return [
        _fmt(row["coherence"]),
        _fmt(row["psnr"], 2),
        _fmt(row["ssim"]),
        _fmt(row["fd_classifier"], 2),
        fid,
    ]


def methods_table(summary: dict) -> list[str]:
    """Pooled over all patterns: one line per reference and method."""
    cost = {m["label"]: m for m in summary["methods"]}
    lines = []
    for row in (r for r in summary["rows"] if r["group"] == ALL):
        method = cost.get(row["method"])
        nfe = "-" if method is None else str(method["nfe"])
        ms = "-" if method is None else f"{1000 * method['seconds_per_frame_set']:.3f}"
        lines.append([row["method"], row["kind"], nfe, ms, *_metric_cells(row)])
    return _table(
        [
            "method",
            "kind",
            "NFE",
            "ms / frame set",
            "coherence",
            "PSNR dB",
            "SSIM",
            "FD classifier",
            "FID (views)",
        ],
        lines,
    )


def patterns_table(summary: dict) -> list[str]:
    """Every pattern and pool, every method."""
    lines = [
        [row["group"], row["method"], *_metric_cells(row)]
        for row in summary["rows"]
        if row["group"] != ALL
    ]
    return _table(
        ["missing", "method", "coherence", "PSNR dB", "SSIM", "FD classifier", "FID (views)"], lines
    )


def tradeoff_tables(tradeoff: dict) -> list[str]:
    """MVLD points (k views sent, each precision) with the best point of every codec sweep that
    fits the same bytes, the verdict per metric, then the codec sweeps."""

    def quality(point: dict) -> str:
        fid = "" if point.get("fid") is None else f", FID {point['fid']:.1f}"
        return f"{point['psnr']:.2f} dB, SSIM {point['ssim']:.3f}{fid}"

    def codec_cell(point: dict | None) -> str:
        if point is None:
            return "cannot fit"
        return f"q{point['quality']} {point['bytes_per_frame_set']:.0f} B: {quality(point)}"

    sweeps = list(tradeoff["codecs"])
    matched = [
        [
            str(r["views_sent"]),
            r["dtype"],
            f"{r['bytes']:.0f}",
            quality(r),
            _fmt(r["coherence"]),
            *(codec_cell(r.get(name)) for name in sweeps),
        ]
        for r in tradeoff["matched"]
    ]
    lines = _table(
        [
            "views sent",
            "latent",
            "bytes / frame set",
            "MVLD, all views",
            "coherence",
            *(f"best {name} within budget" for name in sweeps),
        ],
        matched,
    )
    verdicts = [
        [
            c["metric"],
            f"{c['wins']} of {c['comparisons']}",
            "; ".join(
                f"k={x['views_sent']} {x['dtype']} vs {x['codec']}: "
                f"{x['mvld']:.3f} vs {x['codec_value']:.3f}"
                for x in c["losses"]
            )
            or "none",
        ]
        for c in tradeoff.get("curve_above", [])
    ]
    sweep = [
        [
            name,
            str(p["quality"]),
            f"{p['bytes_per_frame_set']:.0f}",
            _fmt(p["psnr"], 2),
            _fmt(p["ssim"]),
            _fmt(p["coherence"]),
        ]
        for name, points in tradeoff["codecs"].items()
        for p in points
    ]
    return [
        *lines,
        "",
        *_table(["metric", "MVLD better at matched bytes", "where not"], verdicts),
        "",
        *_table(["codec", "quality", "bytes / frame set", "PSNR dB", "SSIM", "coherence"], sweep),
    ]


def targets_table(targets: list[dict]) -> list[str]:
    """The issue's targets with their measured values."""
    verdict = {True: "holds", False: "missed", None: "reported"}
    return _table(
        ["target", "measured", "result"],
        [[t["target"], t["gap"], verdict[t["holds"]]] for t in targets],
    )


def markdown(summary: dict) -> str:
    """The tables of one evaluation as markdown (the body of a RESULTS.md section)."""
    data, settings, speed = summary["data"], summary["settings"], summary["throughput"]
    labelled = "labelled" if data.get("labelled", True) else "(unlabelled)"
    skipped = (
        ""
        if data.get("labelled", True)
        else " Coherence and the classifier's Fréchet distance are skipped: no labels."
    )
    lines = [
        f"Held-out frame sets: stems {data['held_out_stems'][0]}-{data['held_out_stems'][1]}"
        f" (last {settings['val_fraction']:.0%} of the dataset, whole scenes); "
        f"{data['evaluated']} complete {labelled} frame sets evaluated; baselines fitted on "
        f"{data['train_complete']} complete training frame sets. FID on up to "
        f"{settings['fid_samples']} imputed views per method and pattern.{skipped}",
        "",
        "### Targets",
        "",
        *targets_table(summary["targets"]),
        "",
        "### All patterns pooled",
        "",
        *methods_table(summary),
        "",
        f"CPU throughput ({speed['sampler']}, batch {speed['batch']}, 1 of "
        f"{len(summary['cameras'])} views missing, {speed['nfe']} NFE, "
        f"{speed['torch_threads']} torch threads): "
        f"**{speed['frame_sets_per_second']:.1f} frame sets/s** with every view decoded "
        f"({1000 * speed['seconds_per_batch']:.1f} ms imputation + "
        f"{1000 * speed['decode_seconds_per_batch']:.1f} ms decoding per batch; "
        f"{speed['frame_sets_per_second_without_decoding']:.1f} frame sets/s without "
        f"decoding). Score network {speed['score_mflop_per_evaluation']:.1f} MFLOP per "
        f"evaluation, decoder {speed['decoder_mflop_per_frame_set']:.0f} MFLOP per frame "
        f"set: {speed['achieved_gflops']:.1f} GFLOP/s, "
        f"{speed['fraction_of_matmul_limit']:.0%} of this CPU's float32 matmul throughput "
        f"({speed['matmul_gflops_float32']:.0f} GFLOP/s at the same thread count).",
        "",
        "### Per missing-view pattern",
        "",
        *patterns_table(summary),
        "",
        f"### Bandwidth trade-off ({summary['tradeoff']['method']})",
        "",
        *tradeoff_tables(summary["tradeoff"]),
        "",
    ]
    return "\n".join(lines)


def _tile(image: np.ndarray) -> np.ndarray:
    return np.repeat(np.repeat(image, GRID_SCALE, 0), GRID_SCALE, 1)


def _gap(height: int, width: int = GAP) -> np.ndarray:
    return np.full((height, width, 3), 255, np.uint8)


def _join(tiles: list[np.ndarray]) -> np.ndarray:
    """Tiles side by side with a thin white line between them."""
    parts = [tiles[0]]
    for tile in tiles[1:]:
        parts += [_gap(tile.shape[0], INNER_GAP), tile]
    return np.concatenate(parts, 1)


def grid_image(example: GridExample) -> np.ndarray:
    """Rows of frame sets: observed views | true missing views | each sample's missing views."""
    rows = []
    for r in range(len(example.stems)):
        groups = [list(example.observed[r]), list(example.truth[r])]
        groups += [list(sample) for sample in example.samples[r]]
        tiles = [_join([_tile(v) for v in group]) for group in groups]
        height = tiles[0].shape[0]
        row = [tiles[0]]
        for tile in tiles[1:]:
            row += [_gap(height), tile]
        rows.append(np.concatenate(row, 1))
    width = rows[0].shape[1]
    header = np.full((HEADER, width, 3), 255, np.uint8)
    cv2.putText(
        header,
        f"observed | true ({example.pattern}) | samples",
        (2, HEADER - 5),
        cv2.FONT_HERSHEY_SIMPLEX,
        0.35,
        (0, 0, 0),
        1,
        cv2.LINE_AA,
    )
    spacer = np.full((GAP, width, 3), 255, np.uint8)
    parts: list[np.ndarray] = [header]
    for row_image in rows:
        parts += [row_image, spacer]
    return np.concatenate(parts[:-1], 0)


def write_grids(grids: list[GridExample], out: Path) -> list[str]:
    """One PNG per pattern; returns the file names."""
    names = []
    for example in grids:
        name = "grid_" + example.pattern.replace(",", "_").replace(" ", "_") + ".png"
        image = grid_image(example)
        if not cv2.imwrite(str(out / name), cv2.cvtColor(image, cv2.COLOR_RGB2BGR)):
            raise OSError(f"cannot write {out / name}")
        names.append(name)
    return names


def _plot_coherence(plt, summary: dict, path: Path) -> None:
    groups = [g for g in summary["patterns"]] + [ALL]
    methods = list(dict.fromkeys(r["method"] for r in summary["rows"]))
    value = {(r["method"], r["group"]): r["coherence"] for r in summary["rows"]}
    fig, ax = plt.subplots(figsize=(11, 4))
    width = 0.8 / len(methods)
    for i, method in enumerate(methods):
        heights = [value.get((method, g)) or 0.0 for g in groups]
        ax.bar(np.arange(len(groups)) + i * width, heights, width, label=method)
    ax.set_xticks(np.arange(len(groups)) + 0.4 - width / 2, groups, rotation=15, fontsize=8)
    ax.set_ylabel("coherence (classifier agrees with label)")
    ax.set_ylim(0, 1)
    ax.legend(fontsize=7, ncol=4)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _plot_tradeoff(plt, tradeoff: dict, path: Path) -> None:
    fig, axes = plt.subplots(1, 3, figsize=(16, 4.5))
    for ax, metric, label in (
        (axes[0], "psnr", "PSNR of all views (dB)"),
        (axes[1], "ssim", "SSIM of all views"),
        (axes[2], "coherence", "coherence of all views"),
    ):
        if all(p[metric] is None for p in tradeoff["latent"]):  # coherence without labels
            ax.set_axis_off()
            ax.set_title(f"{label}: not measured (no labels)", fontsize=8)
            continue
        for dtype, marker in (("int8", "o-"), ("float16", "s--"), ("float32", "d:")):
            points = [p for p in tradeoff["latent"] if p["dtype"] == dtype]
            xs, ys = [p["bytes"] for p in points], [p[metric] for p in points]
            ax.plot(xs, ys, marker, label=f"MVLD {dtype}, k = 1..V sent", lw=2)
            for p, x, y in zip(points, xs, ys, strict=True):
                ax.annotate(f"k={p['views_sent']}", (x, y), fontsize=7)
        for name, points in tradeoff["codecs"].items():
            ax.plot(
                [p["bytes_per_frame_set"] for p in points],
                [p[metric] for p in points],
                "x-" if "tiled" in name else "^-",
                label=name,
                alpha=0.8,
            )
        if metric == "coherence" and tradeoff["real_coherence"] is not None:
            ax.axhline(tradeoff["real_coherence"], color="grey", ls=":", label="real views")
        ax.set_xscale("log")
        ax.set_xlabel("bytes per frame set (wire message / coded images)")
        ax.set_ylabel(label)
        ax.legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_plots(summary: dict, out: Path) -> list[str]:
    """``coherence.png`` and ``tradeoff.png``; none (with a warning) without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log.warning("matplotlib is not installed (pip install matplotlib): no plots written")
        return []
    names = ["tradeoff.png"]
    if summary["data"].get("labelled", True):  # unlabelled data: no coherence to plot
        _plot_coherence(plt, summary, out / "coherence.png")
        names.insert(0, "coherence.png")
    _plot_tradeoff(plt, summary["tradeoff"], out / "tradeoff.png")
    return names


def finite(value):
    """``value`` with every NaN or infinite float replaced by None (strict JSON)."""
    if isinstance(value, dict):
        return {k: finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def write_outputs(result: EvalResult, out: str | Path) -> Path:
    """Write every output into ``out``; returns the path of ``summary.json``."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    summary = result.summary
    summary["files"] = {
        "markdown": "summary.md",
        "grids": write_grids(result.grids, out),
        "plots": write_plots(summary, out),
    }
    (out / "summary.md").write_text(markdown(summary))
    path = out / "summary.json"
    path.write_text(json.dumps(finite(summary), indent=1, allow_nan=False))
    return path


RESULTS_HEADING = "## Imputation (`mvld-eval`)"


def results_section(summary: dict, out: Path, results: Path, command: str) -> str:
    """The docs/RESULTS.md section: command, hardware, tables, plots and grids."""
    rel = Path(os.path.relpath(out, results.parent)).as_posix()
    hw = summary["hardware"]
    lines = [
        RESULTS_HEADING,
        "",
        "Generated by `mvld-eval` (docs/EVAL.md explains every number). Command:",
        "",
        "```bash",
        command,
        "```",
        "",
        f"Hardware: {hw['cpu']}, {hw['cpu_count']} cores shared with other jobs "
        f"(1-min load average {hw['load_average_1min']:.1f} at the end of the run), "
        f"torch {hw['torch']} with {hw['torch_threads']} threads, device {hw['device']}"
        + (f" ({hw['gpu']})" if "gpu" in hw else "")
        + ".",
        "",
        markdown(summary),
        "",
    ]
    plots = summary["files"]["plots"]
    if plots:
        lines += [f"![{name[:-4]}]({rel}/{name})" for name in plots] + [""]
    grids = summary["files"]["grids"]
    if grids:
        lines += [
            "Image grids (each row a held-out frame set: observed views | true missing "
            "views | samples of the first sampler):",
            "",
        ]
        lines += [f"![{name[:-4]}]({rel}/{name})" for name in grids] + [""]
    return "\n".join(lines)


def update_results(results: Path, section: str) -> None:
    """Replace (or append) the ``RESULTS_HEADING`` section of ``results``, keeping the rest."""
    text = results.read_text() if results.is_file() else "# Results\n"
    start = text.find(RESULTS_HEADING)
    if start < 0:
        text = text.rstrip("\n") + "\n\n" + section
    else:
        following = text.find("\n## ", start + len(RESULTS_HEADING))
        rest = "" if following < 0 else text[following + 1 :]
        text = text[:start] + section + ("\n" + rest if rest else "")
    results.parent.mkdir(parents=True, exist_ok=True)
    results.write_text(text.rstrip("\n") + "\n")
