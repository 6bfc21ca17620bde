"""The demo's report: ``index.html`` with PNG figures and ``summary.json``, from a DemoRecord.

Figures: the views over time (true scene, what the camera delivered, what the receiver
decoded, observed or imputed), the health timeline of every camera as the edge reported it,
the end-to-end latency, and the bandwidth on the wire against raw frames.
"""

from __future__ import annotations

import html
import json
from pathlib import Path
from typing import TYPE_CHECKING

import cv2
import numpy as np

if TYPE_CHECKING:
    from mvld.demo import DemoRecord

STATUS_COLOURS = {"ok": "#2ca02c", "obstructed": "#ff7f0e", "failed": "#d62728",
                  "withheld": "#7f7f7f", "absent": "#000000"}
PROVENANCE_COLOURS = {"observed": "#1f77b4", "imputed": "#9467bd", "unconditioned": "#8c564b"}
TILE = 96  # pixels per view in the image grid
COLUMNS = 8  # time points in the views figure


def view_image(view: dict) -> np.ndarray:
    """The decoded RGB image of one published view."""
    image = view["image"]
    return np.frombuffer(image["b"], np.dtype(image["dt"])).reshape(image["sh"])


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    """Peak signal-to-noise ratio of two uint8 images of the same size, in dB."""
    error = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)
    return float(10 * np.log10(255.0**2 / max(error, 1e-10)))


def _resized(image: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    return cv2.resize(image, size, interpolation=cv2.INTER_AREA)


def delivered_view(record: DemoRecord, camera: int, view: dict, truth: np.ndarray
                   ) -> np.ndarray | None:
    """What the camera delivered to the edge (truth with the demo's fault), None if nothing."""
    from mvld.demo import COVER_FRACTION, COVER_SEED
    from mvld.edge.faults import Occlusion

    if view["capture_time"] is None or view["reason"] in ("read_error", "disconnected",
                                                          "timeout", "stale"):
        return None
    since = view["capture_time"] - record.start_wall
    start, end = record.plan.cover
    if camera == record.plan.cover_camera and start <= since < end:
        return Occlusion(np.random.default_rng(COVER_SEED), COVER_FRACTION).apply(truth)
    return truth


def quality(record: DemoRecord) -> dict[str, dict[str, float]]:
    """PSNR of the receiver's decoded views against the true views, by provenance."""
    from mvld.demo import scene_tick

    scores: dict[str, list[float]] = {}
    for result in record.results:
        tick = scene_tick(record, result)
        if tick is None or tick not in record.truth:
            continue
        for index, view in enumerate(result["views"]):
            truth = record.truth[tick][index]
            decoded = _resized(view_image(view), truth.shape[1::-1])
            scores.setdefault(view["provenance"], []).append(psnr(decoded, truth))
    return {name: {"views": len(values), "psnr_db_mean": float(np.mean(values))}
            for name, values in sorted(scores.items())}


def _label(tile: np.ndarray, text: str, colour: tuple[int, int, int]) -> np.ndarray:
    out = tile.copy()
    cv2.rectangle(out, (0, TILE - 14), (TILE - 1, TILE - 1), (0, 0, 0), -1)
    cv2.putText(out, text, (2, TILE - 4), cv2.FONT_HERSHEY_SIMPLEX, 0.33, colour, 1,
                cv2.LINE_AA)
    return out


def _column(record: DemoRecord, result: dict, truth: list[np.ndarray]) -> np.ndarray:
    """One time point: per camera three tiles (true, delivered, received), stacked."""
    tiles = []
    for camera, view in enumerate(result["views"]):
        true = _resized(truth[camera], (TILE, TILE))
        delivered = delivered_view(record, camera, view, truth[camera])
        delivered_tile = (np.full((TILE, TILE, 3), 40, np.uint8) if delivered is None
                          else _resized(delivered, (TILE, TILE)))
        received = _resized(view_image(view), (TILE, TILE))
        colour = (255, 255, 255) if view["provenance"] == "observed" else (255, 120, 255)
        tiles += [_label(true, f"{view['cam']} true", (255, 255, 255)),
                  _label(delivered_tile, "camera" if delivered is not None else "no frame",
                         (255, 255, 255)),
                  _label(received, view["provenance"], colour)]
    return np.concatenate(tiles, axis=0)


def views_figure(record: DemoRecord, path: Path) -> None:
    """Grid: columns = time points, rows = (true, delivered, received) for every camera."""
    from mvld.demo import scene_tick

    usable = [r for r in record.results if scene_tick(record, r) in record.truth]
    if not usable:
        return
    picks = [usable[i] for i in np.linspace(0, len(usable) - 1, COLUMNS).astype(int)]
    columns = []
    for result in picks:
        column = _column(record, result, record.truth[scene_tick(record, result)])
        header = np.zeros((16, TILE, 3), np.uint8)
        when = result["send_time"] - record.start_wall
        cv2.putText(header, f"t={when:.1f}s", (4, 12), cv2.FONT_HERSHEY_SIMPLEX, 0.4,
                    (255, 255, 255), 1, cv2.LINE_AA)
        columns.append(np.concatenate([header, column], axis=0))
        columns.append(np.full((columns[-1].shape[0], 4, 3), 255, np.uint8))
    grid = np.concatenate(columns[:-1], axis=1)
    cv2.imwrite(str(path), grid[:, :, ::-1])


def health_figure(record: DemoRecord, path: Path) -> None:
    """Per camera: the edge's status and the receiver's provenance over time."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cameras = [v["cam"] for v in record.results[0]["views"]] if record.results else []
    figure, axis = plt.subplots(figsize=(10, 0.9 + 0.8 * len(cameras)))
    times = np.array([r["send_time"] - record.start_wall for r in record.results])
    for row in range(len(cameras)):
        statuses = [r["views"][row]["status"] for r in record.results]
        provenances = [r["views"][row]["provenance"] for r in record.results]
        y = 2 * (len(cameras) - 1 - row)
        axis.scatter(times, np.full(len(times), y + 0.5), c=[STATUS_COLOURS[s] for s in statuses],
                     marker="|", s=300)
        axis.scatter(times, np.full(len(times), y), c=[PROVENANCE_COLOURS[p] for p in provenances],
                     marker="|", s=150)
    axis.set_yticks([2 * (len(cameras) - 1 - i) + d for i in range(len(cameras)) for d in (0, .5)])
    axis.set_yticklabels([f"{c} {what}" for c in cameras for what in ("received", "edge status")])
    for name, colour in {**STATUS_COLOURS, **PROVENANCE_COLOURS}.items():
        axis.scatter([], [], c=colour, marker="s", label=name)
    axis.legend(ncol=4, fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.25))
    axis.set_xlabel("seconds since the stream started")
    axis.set_title("health per camera (edge) and where each view came from (receiver)")
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)


def latency_figure(record: DemoRecord, path: Path) -> None:
    """Capture-to-decoded latency over time and its histogram."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    latency = np.array([1000 * r["latency_s"] for r in record.results])
    times = np.array([r["send_time"] - record.start_wall for r in record.results])
    figure, (left, right) = plt.subplots(1, 2, figsize=(10, 3.2))
    left.plot(times, latency, ".", markersize=3)
    left.set_xlabel("seconds since the stream started")
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
    return samples[1:, 0] - record.start_wall, rate


def bandwidth_figure(record: DemoRecord, path: Path, raw_bytes_per_s: float) -> None:
    """Wire bytes per second of the latents against the raw frames they stand for."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    times, rate = bandwidth_series(record)
    figure, axis = plt.subplots(figsize=(10, 3.2))
    axis.plot(times, rate / 1000, label="latents on the wire (edge counter)")
    axis.axhline(raw_bytes_per_s / 1000, color="grey", linestyle="--",
                 label="raw RGB frames of the 3 cameras")
    axis.set_yscale("log")
    axis.set_xlabel("seconds since the stream started")
    axis.set_ylabel("kB/s")
    axis.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)


def summarise(record: DemoRecord) -> dict:
    """The numbers the report states, also written to ``summary.json``."""
    latency = np.array([1000 * r["latency_s"] for r in record.results]) if record.results \
        else np.zeros(1)
    provenance: dict[str, dict[str, int]] = {}
    for result in record.results:
        for view in result["views"]:
            counts = provenance.setdefault(view["cam"], {})
            counts[view["provenance"]] = counts.get(view["provenance"], 0) + 1
    _, rate = bandwidth_series(record)
    size = record.truth[next(iter(record.truth))][0].shape if record.truth else (64, 64, 3)
    drops = {k: v for k, v in record.receiver_metrics.items()
             if k.startswith("mvld_receiver_dropped_total")}
    return {
        "seconds": record.config.seconds, "fps": record.config.fps,
        "framesets_received": len(record.results),
        "framesets_sent_by_edge": record.edge_metrics.get("mvld_edge_framesets_sent_total"),
        "views_by_camera_and_provenance": provenance,
        "latency_ms": {"p50": float(np.percentile(latency, 50)),
                       "p90": float(np.percentile(latency, 90)),
                       "p99": float(np.percentile(latency, 99)), "max": float(latency.max())},
        "wire_bytes_per_s_mean": float(rate.mean()) if rate.size else None,
        "raw_bytes_per_s": float(3 * np.prod(size) * record.config.fps),
        "psnr_vs_truth": quality(record),
        "receiver_drops": drops,
        "faults": {"cam1_stopped_s": list(record.plan.stop),
                   "cam2_covered_s": list(record.plan.cover)},
    }


def _table(rows: list[tuple[str, str]]) -> str:
    cells = "".join(f"<tr><th>{html.escape(k)}</th><td>{html.escape(v)}</td></tr>"
                    for k, v in rows)
    return f"<table>{cells}</table>"


def _html(summary: dict) -> str:
    latency = summary["latency_ms"]
    quality_text = "; ".join(f"{name}: {q['psnr_db_mean']:.1f} dB over {q['views']} views"
                             for name, q in summary["psnr_vs_truth"].items())
    wire = summary["wire_bytes_per_s_mean"]
    rows = [
        ("run", f"{summary['seconds']:g} s, 3 simulated cameras at {summary['fps']:g} FPS"),
        ("faults", f"cam1 stops {summary['faults']['cam1_stopped_s'][0]:.0f}-"
                   f"{summary['faults']['cam1_stopped_s'][1]:.0f} s; cam2 covered (60%) "
                   f"{summary['faults']['cam2_covered_s'][0]:.0f}-"
                   f"{summary['faults']['cam2_covered_s'][1]:.0f} s"),
        ("frame sets", f"{summary['framesets_received']} decoded by the receiver, "
                       f"{summary['framesets_sent_by_edge']} sent by the edge"),
        ("views per camera", json.dumps(summary["views_by_camera_and_provenance"])),
        ("latency (capture to decoded)", f"p50 {latency['p50']:.0f} ms, p90 "
                                         f"{latency['p90']:.0f} ms, p99 {latency['p99']:.0f} ms"),
        ("bandwidth", f"{wire / 1000:.2f} kB/s of latents vs "
                      f"{summary['raw_bytes_per_s'] / 1000:.0f} kB/s of raw frames"
                      if wire else "n/a"),
        ("PSNR against the true views", quality_text or "n/a"),
        ("receiver drops", json.dumps(summary["receiver_drops"]) or "none"),
    ]
    figures = [("views.png", "Views over time. Per camera: the true scene, what the camera "
                "delivered to the edge, and what the receiver decoded (observed = the edge's "
                "latent; imputed = generated from the other cameras' latents)."),
               ("health.png", "Health timeline: the edge's status per camera and the "
                "provenance of each view at the receiver."),
               ("latency.png", "End-to-end latency, capture on the edge to decoded images at "
                "the receiver (one machine, one clock)."),
               ("bandwidth.png", "Bytes per second on the wire against the raw frames.")]
    body = "".join(f"<h2>{html.escape(name)}</h2><p>{html.escape(text)}</p>"
                   f"<img src='{name}' alt='{name}'>" for name, text in figures)
    return ("<!doctype html><html><head><meta charset='utf-8'><title>MVLD demo report</title>"
            "<style>body{font-family:sans-serif;max-width:1100px;margin:auto}"
            "th{text-align:left;padding-right:1em}img{max-width:100%}</style></head><body>"
            "<h1>MVLD demo report</h1>" + _table(rows) + body +
            "<p>Logs of both processes: <a href='logs/receiver.log'>receiver</a>, "
            "<a href='logs/edge.log'>edge</a>. Numbers: <a href='summary.json'>summary.json</a>."
            "</p></body></html>")


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
