"""The demo's report: ``index.html`` with PNG figures and ``summary.json``, from a DemoRecord.

Figures: the views over time (true scene, what the camera delivered, what the receiver
decoded, observed or imputed), the health timeline of every camera as the edge reported it,
the end-to-end latency, and the bandwidth on the wire against raw frames. Time runs from the
start of the fault clock (0 s); frame sets sent before it, while the edge warmed up, are
counted in the tables but not drawn.
"""

from __future__ import annotations

import html
import itertools
import json
from pathlib import Path

import cv2
import numpy as np

from mvld.demo_record import DemoRecord, scene_tick
from mvld.sim.demo_source import COVER_FRACTION, COVER_SEED
from mvld.sim.faults import Occlusion
from mvld.train.image_quality import psnr

STATUS_COLOURS = {
    "ok": "#2ca02c",
    "obstructed": "#ff7f0e",
    "failed": "#d62728",
    "withheld": "#7f7f7f",
    "absent": "#000000",
}
PROVENANCE_COLOURS = {"observed": "#1f77b4", "imputed": "#9467bd", "unconditioned": "#8c564b"}
DROPPED_COLOUR = "#d9d9d9"  # no frame set arrived at that time
TILE = 144  # pixels per view in the image grid
CAPTION = 18  # pixels of the caption strip under each tile
COLUMNS = 8  # time points in the views figure
PROVENANCE_MEANING = {
    "observed": "decoded from the latent the edge sent",
    "imputed": "generated from the other cameras' latents",
    "unconditioned": "generated from the model alone: no camera of that frame set was usable "
    "(e.g. while the edge's health monitor was still warming up)",
}


def view_image(view: dict) -> np.ndarray:
    """The decoded RGB image of one published view."""
    image = view["image"]
    return np.frombuffer(image["b"], np.dtype(image["dt"])).reshape(image["sh"])


def _resized(image: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    return cv2.resize(image, size, interpolation=cv2.INTER_AREA)


def since_start(record: DemoRecord, result: dict) -> float:
    """Seconds from the fault clock's start (0) to the frame set's send time."""
    return result["send_time"] - record.start_wall


def drawn_results(record: DemoRecord) -> list[dict]:
    """The frame sets the figures draw: those sent once the fault clock had started."""
    return [r for r in record.results if since_start(record, r) >= 0]


def delivered_view(
    record: DemoRecord, camera: int, view: dict, truth: np.ndarray
) -> np.ndarray | None:
    """What the camera delivered to the edge (truth with the demo's fault), None if nothing."""
    if view["capture_time"] is None or view["reason"] in (
        "read_error",
        "disconnected",
        "timeout",
        "stale",
    ):
        return None
    since = view["capture_time"] - record.start_wall
    start, end = record.plan.cover
    if camera == record.plan.cover_camera and start <= since < end:
        return Occlusion(np.random.default_rng(COVER_SEED), COVER_FRACTION).apply(truth)
    return truth


def quality(record: DemoRecord) -> dict[str, dict[str, float]]:
    """PSNR of the receiver's decoded views against the true views, by provenance."""
    scores: dict[str, list[float]] = {}
    for result in record.results:
        tick = scene_tick(record, result)
        if tick is None or tick not in record.truth:
            continue
        for index, view in enumerate(result["views"]):
            truth = record.truth[tick][index]
            decoded = _resized(view_image(view), truth.shape[1::-1])
            value = float(psnr(decoded[None], truth[None])[0])
            scores.setdefault(view["provenance"], []).append(value)
    return {
        name: {"views": len(values), "psnr_db_mean": float(np.mean(values))}
        for name, values in sorted(scores.items())
    }


def _label(tile: np.ndarray, text: str, colour: tuple[int, int, int]) -> np.ndarray:
    """The tile with a caption strip below it (the picture itself stays uncovered)."""
    strip = np.zeros((CAPTION, TILE, 3), np.uint8)
    cv2.putText(
        strip, text, (3, CAPTION - 5), cv2.FONT_HERSHEY_SIMPLEX, 0.42, colour, 1, cv2.LINE_AA
    )
    return np.concatenate([tile, strip], axis=0)


def _column(record: DemoRecord, result: dict, truth: list[np.ndarray]) -> np.ndarray:
    """One time point: per camera three tiles (true, delivered, received), stacked."""
    tiles = []
    for camera, view in enumerate(result["views"]):
        true = _resized(truth[camera], (TILE, TILE))
        delivered = delivered_view(record, camera, view, truth[camera])
        delivered_tile = (
            np.full((TILE, TILE, 3), 40, np.uint8)
            if delivered is None
            else _resized(delivered, (TILE, TILE))
        )
        received = _resized(view_image(view), (TILE, TILE))
        colour = (255, 255, 255) if view["provenance"] == "observed" else (255, 120, 255)
        tiles += [
            _label(true, f"{view['cam']} true", (255, 255, 255)),
            _label(
                delivered_tile, "camera" if delivered is not None else "no frame", (255, 255, 255)
            ),
            _label(received, view["provenance"], colour),
        ]
    return np.concatenate(tiles, axis=0)


def views_figure(record: DemoRecord, path: Path) -> None:
    """Grid: columns = time points, rows = (true, delivered, received) for every camera."""
    usable = [
        (r, tick)
        for r in drawn_results(record)
        if (tick := scene_tick(record, r)) is not None and tick in record.truth
    ]
    if not usable:
        return
    picks = [usable[i] for i in np.linspace(0, len(usable) - 1, COLUMNS).astype(int)]
    columns = []
    for result, tick in picks:
        column = _column(record, result, record.truth[tick])
        header = np.zeros((22, TILE, 3), np.uint8)
        cv2.putText(
            header,
            f"t = {since_start(record, result):.1f} s",
            (4, 16),
            cv2.FONT_HERSHEY_SIMPLEX,
            0.5,
            (255, 255, 255),
            1,
            cv2.LINE_AA,
        )
        columns.append(np.concatenate([header, column], axis=0))
        columns.append(np.full((columns[-1].shape[0], 4, 3), 255, np.uint8))
    grid = np.concatenate(columns[:-1], axis=1)
    cv2.imwrite(str(path), grid[:, :, ::-1])


def _runs(times: np.ndarray, colours: list[str], period: float) -> list[tuple[float, float, str]]:
    """``(start, width, colour)`` bars: one frame set covers one period around its time;
    neighbours of one colour merge, and a missing frame set leaves a gap."""
    bars: list[tuple[float, float, str]] = []
    for when, colour in zip(times, colours, strict=True):
        start = when - period / 2
        if bars and bars[-1][2] == colour and start - sum(bars[-1][:2]) < period / 2:
            bars[-1] = (bars[-1][0], when + period / 2 - bars[-1][0], colour)
        else:
            bars.append((start, period, colour))
    return bars


def dropped_spans(times: np.ndarray, period: float) -> list[tuple[float, float]]:
    """``(start, width)`` of the stretches where no frame set arrived (gaps over 1.5 periods)."""
    return [
        (a + period / 2, b - a - period)
        for a, b in itertools.pairwise(times)
        if b - a > 1.5 * period
    ]


def health_figure(record: DemoRecord, path: Path) -> None:
    """Per camera: the edge's status and the receiver's provenance over time."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch

    results = drawn_results(record)
    cameras = [v["cam"] for v in results[0]["views"]] if results else []
    period = 1.0 / record.config.fps
    figure, axis = plt.subplots(figsize=(11, 1.6 + 0.8 * len(cameras)))
    times = np.array([since_start(record, r) for r in results])
    for start, width in dropped_spans(times, period):
        axis.axvspan(start, start + width, color=DROPPED_COLOUR, zorder=0)
    for row in range(len(cameras)):
        y = 2 * (len(cameras) - 1 - row)
        status = [STATUS_COLOURS[r["views"][row]["status"]] for r in results]
        origin = [PROVENANCE_COLOURS[r["views"][row]["provenance"]] for r in results]
        for colours, bottom in ((status, y + 0.5), (origin, y - 0.3)):
            bars = _runs(times, colours, period)
            axis.broken_barh(
                [(a, w) for a, w, _ in bars], (bottom, 0.6), facecolors=[c for _, _, c in bars]
            )
    axis.set_yticks([2 * (len(cameras) - 1 - i) + d for i in range(len(cameras)) for d in (0, 0.8)])
    axis.set_yticklabels([f"{c} {what}" for c in cameras for what in ("received", "edge status")])
    axis.set_xlim(0, record.config.seconds)
    handles = [Patch(color=c, label=f"edge: {name}") for name, c in STATUS_COLOURS.items()]
    handles += [Patch(color=c, label=f"receiver: {name}") for name, c in PROVENANCE_COLOURS.items()]
    handles.append(Patch(color=DROPPED_COLOUR, label="no frame set received (dropped)"))
    axis.legend(
        handles=handles, ncol=5, fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.22)
    )
    axis.set_xlabel("seconds since the fault clock started")
    axis.set_title("health per camera (edge) and where each view came from (receiver)")
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)


def latency_figure(record: DemoRecord, path: Path) -> None:
    """Capture-to-decoded latency over time and its histogram."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    results = drawn_results(record)
    latency = np.array([1000 * r["latency_s"] for r in results])
    times = np.array([since_start(record, r) for r in results])
    figure, (left, right) = plt.subplots(1, 2, figsize=(10, 3.2))
    left.plot(times, latency, ".", markersize=3)
    left.set_xlim(0, record.config.seconds)
    left.set_xlabel("seconds since the fault clock started")
    left.set_ylabel("capture to decoded (ms)")
    right.hist(latency, bins=40)
    right.set_xlabel("latency (ms)")
    right.set_ylabel("frame sets")
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)


def bandwidth_series(record: DemoRecord) -> tuple[np.ndarray, np.ndarray]:
    """(seconds since start, wire bytes/s) from the edge's byte counter."""
    if len(record.edge_bytes) < 2:
        return np.zeros(0), np.zeros(0)
    samples = np.array(record.edge_bytes)
    rate = np.diff(samples[:, 1]) / np.maximum(np.diff(samples[:, 0]), 1e-3)
    times = samples[1:, 0] - record.start_wall
    return times[times >= 0], rate[times >= 0]


def bandwidth_figure(record: DemoRecord, path: Path, raw_bytes_per_s: float) -> None:
    """Wire bytes per second of the latents against the raw frames they stand for."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    times, rate = bandwidth_series(record)
    figure, axis = plt.subplots(figsize=(10, 3.2))
    axis.plot(times, rate / 1000, label="latents on the wire (edge counter)")
    axis.axhline(
        raw_bytes_per_s / 1000,
        color="grey",
        linestyle="--",
        label="raw RGB frames of the 3 cameras",
    )
    axis.set_yscale("log")
    axis.set_xlim(0, record.config.seconds)
    axis.set_xlabel("seconds since the fault clock started")
    axis.set_ylabel("kB/s")
    axis.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)


def summarise(record: DemoRecord) -> dict:
    """The numbers the report states, also written to ``summary.json``."""
    latency = (
        np.array([1000 * r["latency_s"] for r in record.results]) if record.results else np.zeros(1)
    )
    provenance: dict[str, dict[str, int]] = {}
    for result in record.results:
        for view in result["views"]:
            counts = provenance.setdefault(view["cam"], {})
            counts[view["provenance"]] = counts.get(view["provenance"], 0) + 1
    _, rate = bandwidth_series(record)
    size = record.truth[next(iter(record.truth))][0].shape if record.truth else (64, 64, 3)
    drops = {
        k: v
        for k, v in record.receiver_metrics.items()
        if k.startswith("mvld_receiver_dropped_total")
    }
    return {
        "seconds": record.config.seconds,
        "fps": record.config.fps,
        "framesets_received": len(record.results),
        "framesets_before_start": len(record.results) - len(drawn_results(record)),
        "framesets_sent_by_edge": record.edge_metrics.get("mvld_edge_framesets_sent_total"),
        "views_by_camera_and_provenance": provenance,
        "latency_ms": {
            "p50": float(np.percentile(latency, 50)),
            "p90": float(np.percentile(latency, 90)),
            "p99": float(np.percentile(latency, 99)),
            "max": float(latency.max()),
        },
        "wire_bytes_per_s_mean": float(rate.mean()) if rate.size else None,
        "raw_bytes_per_s": float(3 * np.prod(size) * record.config.fps),
        "psnr_vs_truth": quality(record),
        "receiver_drops": drops,
        "faults": {
            "cam1_stopped_s": list(record.plan.stop),
            "cam2_covered_s": list(record.plan.cover),
        },
    }


def _table(rows: list[tuple[str, str]]) -> str:
    cells = "".join(f"<tr><th>{html.escape(k)}</th><td>{html.escape(v)}</td></tr>" for k, v in rows)
    return f"<table>{cells}</table>"


def _grid(header: list[str], rows: list[list[str]]) -> str:
    """A table with a header row; every cell is plain text."""
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join(
        "<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in row) + "</tr>" for row in rows
    )
    return f"<table class='grid'><tr>{head}</tr>{body}</table>"


def _drops_text(drops: dict[str, float]) -> str:
    """``mvld_receiver_dropped_total{reason="stale"} 3`` -> ``stale: 3``; 'none' if empty."""
    parts = []
    for name, count in sorted(drops.items()):
        reason = name.partition('reason="')[2].rstrip('"}') or name
        parts.append(f"{reason}: {count:.0f}")
    return ", ".join(parts) or "none"


def _html(summary: dict) -> str:
    latency = summary["latency_ms"]
    wire = summary["wire_bytes_per_s_mean"]
    faults = summary["faults"]
    early = summary.get("framesets_before_start", 0)
    rows = [
        ("run", f"{summary['seconds']:g} s, 3 simulated cameras at {summary['fps']:g} FPS"),
        (
            "faults",
            f"cam1 stops at {faults['cam1_stopped_s'][0]:.0f}-"
            f"{faults['cam1_stopped_s'][1]:.0f} s; cam2 is 60% covered at "
            f"{faults['cam2_covered_s'][0]:.0f}-{faults['cam2_covered_s'][1]:.0f} s",
        ),
        (
            "frame sets",
            f"{summary['framesets_received']} decoded by the receiver, "
            f"{summary['framesets_sent_by_edge']:.0f} sent by the edge"
            + (
                f" ({early} of them before 0 s, while the edge warmed up: counted here, not drawn)"
                if early
                else ""
            ),
        ),
        (
            "latency (capture to decoded)",
            f"p50 {latency['p50']:.0f} ms, p90 "
            f"{latency['p90']:.0f} ms, p99 {latency['p99']:.0f} ms",
        ),
        (
            "bandwidth",
            f"{wire / 1000:.2f} kB/s of latents vs "
            f"{summary['raw_bytes_per_s'] / 1000:.0f} kB/s of raw frames"
            if wire
            else "n/a",
        ),
        ("receiver drops", _drops_text(summary["receiver_drops"])),
    ]
    kinds = list(PROVENANCE_COLOURS)
    views = summary["views_by_camera_and_provenance"]
    view_rows = [
        [camera, *(str(counts.get(k, 0)) for k in kinds), str(sum(counts.values()))]
        for camera, counts in views.items()
    ]
    quality_rows = [
        [name, str(q["views"]), f"{q['psnr_db_mean']:.1f}"]
        for name, q in summary["psnr_vs_truth"].items()
    ]
    meaning = "".join(
        f"<li><b>{html.escape(k)}</b>: {html.escape(v)}</li>" for k, v in PROVENANCE_MEANING.items()
    )
    tables = (
        _table(rows)
        + "<h2>Where each view came from</h2>"
        + _grid(["camera", *kinds, "total"], view_rows)
        + f"<ul>{meaning}</ul>"
        + "<h2>Quality against the true views</h2>"
        + (_grid(["view", "views", "PSNR (dB)"], quality_rows) if quality_rows else "<p>n/a</p>")
    )
    figures = [
        (
            "views.png",
            "Views over time. Per camera three rows: the true scene, what "
            "the camera delivered to the edge ('no frame' while it was stopped), and what "
            "the receiver decoded, captioned with where it came from.",
        ),
        (
            "health.png",
            "Health timeline: the edge's status of each camera (upper bar) "
            "and where the receiver's view came from (lower bar). Grey stretches: no frame "
            "set arrived at all (dropped on the way, or the receiver fell behind).",
        ),
        (
            "latency.png",
            "End-to-end latency, capture on the edge to decoded images at "
            "the receiver (one machine, one clock).",
        ),
        ("bandwidth.png", "Bytes per second on the wire against the raw frames."),
    ]
    body = "".join(
        f"<h2>{html.escape(name)}</h2><p>{html.escape(text)}</p><img src='{name}' alt='{name}'>"
        for name, text in figures
    )
    return (
        "<!doctype html><html><head><meta charset='utf-8'><title>MVLD demo report</title>"
        "<style>body{font-family:sans-serif;max-width:1200px;margin:auto}"
        "th{text-align:left;padding-right:1em}img{max-width:100%}"
        "table.grid{border-collapse:collapse}table.grid td,table.grid th"
        "{border:1px solid #ccc;padding:2px 10px}table.grid td{text-align:right}"
        "</style></head><body>"
        "<h1>MVLD demo report</h1>"
        + tables
        + body
        + "<p>Logs of both processes: <a href='logs/receiver.log'>receiver</a>, "
        "<a href='logs/edge.log'>edge</a>. Numbers: <a href='summary.json'>summary.json</a>."
        "</p></body></html>"
    )


def write_report(record: DemoRecord, out: Path) -> Path:
    """Write the figures, ``summary.json`` and ``index.html`` into ``out``; return the HTML."""
    out.mkdir(parents=True, exist_ok=True)
    summary = summarise(record)
    views_figure(record, out / "views.png")
    health_figure(record, out / "health.png")
    latency_figure(record, out / "latency.png")
    bandwidth_figure(record, out / "bandwidth.png", summary["raw_bytes_per_s"])
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    index = out / "index.html"
    index.write_text(_html(summary))
    return index
