"""Issue 17, item 7: the demo report reads well: tables not JSON, time from 0, dropped frame
sets drawn and named in the legend, 'unconditioned' explained. A synthetic record: 10 FPS,
frame sets from -1 s to 8 s with none between 3 and 5 s (dropped)."""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
import pytest

from mvld.demo_record import DemoConfig, DemoRecord, FaultPlan
from mvld.report import DROPPED_COLOUR, dropped_spans, write_report

pytest.importorskip("matplotlib")

START = 1000.0


def _result(seq: int, when: float) -> dict:
    image = np.zeros((8, 8, 3), np.uint8)
    views = [
        {
            "cam": f"cam{c}",
            "status": "ok" if c != 1 or when < 2 else "failed",
            "reason": None,
            "capture_time": START + when,
            "provenance": "unconditioned"
            if seq == 0
            else ("observed" if c != 1 or when < 2 else "imputed"),
            "image": {"b": image.tobytes(), "dt": "uint8", "sh": [8, 8, 3]},
        }
        for c in range(3)
    ]
    return {
        "seq": seq,
        "node": "demo-node",
        "send_time": START + when,
        "latency_s": 0.1,
        "views": views,
    }


@pytest.fixture
def record() -> DemoRecord:
    times = [t / 10 for t in range(-10, 80) if not 30 <= t < 50]
    record = DemoRecord(DemoConfig(seconds=8.0), FaultPlan.for_duration(8.0), START)
    record.results = [_result(i, t) for i, t in enumerate(times)]
    record.edge_bytes = [(START + t, 1000.0 * (t + 1)) for t in range(-1, 9)]
    record.edge_metrics = {"mvld_edge_framesets_sent_total": float(len(times))}
    record.receiver_metrics = {'mvld_receiver_dropped_total{reason="stale"}': 3.0}
    return record


def test_gaps_between_frame_sets_are_the_dropped_spans() -> None:
    times = np.array([0.0, 0.1, 0.2, 0.6, 0.7])
    spans = dropped_spans(times, 0.1)
    assert len(spans) == 1 and spans[0] == pytest.approx((0.25, 0.3))
    assert dropped_spans(times[:3], 0.1) == []


def test_report_tables_time_axis_legend_and_words(record: DemoRecord, tmp_path: Path) -> None:
    index = write_report(record, tmp_path)
    text = index.read_text()
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["framesets_before_start"] == 10
    assert "{" not in text.split("<style>")[1].split("</style>")[1], "raw JSON in the page"
    assert "<td>stale: 3</td>" in text
    assert "<tr><td>cam1</td><td>" in text  # views per camera is a table
    assert "<b>unconditioned</b>: generated from the model alone" in text
    assert "(10 of them before 0 s" in text
    health = cv2.imread(str(tmp_path / "health.png"))[:, :, ::-1]
    grey = np.array([int(DROPPED_COLOUR[i : i + 2], 16) for i in (1, 3, 5)])
    shaded = np.all(np.abs(health.astype(int) - grey) <= 2, axis=2)
    columns = np.where(shaded.sum(axis=0) > 0.3 * health.shape[0])[0]
    assert len(columns) > 0, "the dropped stretch is not drawn"
    # the plot spans 0..8 s; the shaded columns sit at 3..5 s, i.e. in its middle quarter
    middle = (columns.min() + columns.max()) / 2 / health.shape[1]
    assert 0.35 < middle < 0.6
